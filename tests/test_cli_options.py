"""Command-line checks that need no mount: a bad option is one clear line, exit 1."""

from __future__ import annotations

import pytest

from tmemfs.cli import build_parser, mount_options


@pytest.mark.parametrize("size", ["256", "3000", "65536"])
def test_page_size_out_of_range_is_refused(size: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(["mount", "--page-size", size, "/mnt/tmem"])
    with pytest.raises(SystemExit) as exit_:
        mount_options(args, parser)
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip() == (
        "tmemfs: --page-size must be a power of two from 512 to 32768"
    )


@pytest.mark.parametrize("size", [512, 4096, 32768])
def test_page_sizes_in_range_are_taken(size: int) -> None:
    parser = build_parser()
    args = parser.parse_args(["mount", "--page-size", str(size), "/mnt/tmem"])
    assert mount_options(args, parser).page_size == size
