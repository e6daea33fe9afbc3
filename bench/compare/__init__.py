"""The six comparisons; each `run(ctx)` returns a Section and draws its plots."""
