# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The index of one tmem object's pages, compiled: page index -> (handle, mtime).

It replaces a `dict[int, Entry]`, which cost about 160 bytes per page in CPython (the
Entry, its handle int and the dict slot with its key int). Here a page costs 9 bytes
in a full leaf, and its leaf's share of the buckets (under a byte) on top:

- Pages live in leaves of 32 consecutive indexes (a swap area and a file's pages are
  dense runs), each leaf a bitmap of the slots in use, 32 uint32 handles, 32 uint32
  mtimes (whole seconds since the epoch: page mtimes have 1 s resolution) and one
  int64 `changed` stamp.
- Leaves are found through an open-addressing table keyed by leaf number (linear
  probing, backward-shift deletion), so a sparse object costs one leaf per run, not
  an array as long as its largest index. A leaf whose last page goes is freed at once.
- A handle that is an int below the sentinel 2**32 - 1 (the compiled store's record
  id, Redis's payload size) is kept as is. Anything else (a raw page's bytes, a page
  moved down to the writeback tier, a lost page, an int too large) is kept in a side
  dict; those are rare here.

Telling one store of a page from a later one. An `Entry` taken out before an await is
compared with the table's afterwards (the writeback tier, `Engine._lost`), and must
compare equal only if the page was not stored anew meanwhile. A page has no stamp of
its own (its mtime is whole seconds, and a handle may come back: a freed record id,
a Redis payload size); its leaf has one. Every store into a leaf (put, put_run, and
setting an Entry, which replaces a page's content) gives the leaf's `changed` a new
value, and an Entry carries the handle, the mtime and the leaf's `changed` as it was
when the Entry was taken; two Entries are equal only if all three agree. So:

- A store of the page, or of any other page of its leaf (a neighbour), makes an older
  Entry compare unequal. For a neighbour's store that is conservative, never wrong:
  the writeback tier skips the page and moves it on a later pass, `Engine._lost`
  leaves the page as it is.
- `set_handle` (a page moved down to the tier, or lost) is not a store: it keeps the
  leaf's `changed`, so moving a batch of neighbouring pages down one by one does not
  make the rest of the batch look stored anew; the handle itself differs, so an Entry
  taken before `set_handle` still compares unequal to the page's after it.
- The value given is the store's stamp (the engine's, strictly increasing, in
  nanoseconds), or one more than the last value given by any table sharing the
  `IndexMemory` if that is larger (a store whose stamp was taken before an await, a
  batch that stores one page twice with one stamp, a test's small stamps). So the
  values one meter hands out strictly increase: a leaf never takes a value twice, and
  a leaf freed and made again never takes a value an Entry of its old life holds.

Every table of an engine adds its bytes to one `IndexMemory`, which is what
`pool_total_size` counts for the index.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.long cimport PyLong_AsLongLongAndOverflow
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc

cdef extern from *:
    """
    #ifndef TMEMFS_SOURCE_DIGEST
    #define TMEMFS_SOURCE_DIGEST ""
    #endif
    """
    const char* TMEMFS_SOURCE_DIGEST

#: The digest of the .pyx this module was compiled from (setup.py; tmemfs/build.py).
SOURCE_DIGEST = TMEMFS_SOURCE_DIGEST.decode()

cdef enum:
    LEAF_BITS = 5
    LEAF_SLOTS = 32
    LEAF_MASK = 31
    # What malloc adds to each leaf (glibc: one size word, rounded to 16 bytes).
    MALLOC_OVERHEAD = 16

# The handle lives in the side dict. Ints from 0 up to it (excluded) are kept inline.
cdef uint32_t OBJECT = 0xFFFFFFFF
cdef int64_t NS = 1000000000


cdef struct Leaf:
    uint32_t present
    uint32_t count
    int64_t changed         # the value of the latest store into any of its pages
    uint32_t handle[LEAF_SLOTS]
    uint32_t mtime[LEAF_SLOTS]      # whole seconds since the epoch


cdef struct Bucket:
    uint64_t key        # leaf number + 1; 0 for an empty bucket
    Leaf* leaf


cdef inline uint64_t mix(uint64_t x) noexcept nogil:
    # splitmix64's finalizer: consecutive leaf numbers spread over the table.
    x ^= x >> 30
    x *= 0xBF58476D1CE4E5B9ULL
    x ^= x >> 27
    x *= 0x94D049BB133111EBULL
    x ^= x >> 31
    return x


cdef inline uint32_t seconds(int64_t stamp_ns) noexcept nogil:
    """A stamp in nanoseconds as whole seconds since the epoch (0 up to 2**32 - 1)."""
    if stamp_ns <= 0:
        return 0
    if stamp_ns // NS >= <int64_t>0xFFFFFFFF:
        return 0xFFFFFFFF
    return <uint32_t>(stamp_ns // NS)


cdef inline bint inline_handle(object handle, uint32_t* out):
    """Whether `handle` is kept in the leaf (an int from 0 below the sentinel), and as what."""
    cdef int overflow = 0
    cdef long long value = 0
    if type(handle) is not int:
        return False
    value = PyLong_AsLongLongAndOverflow(handle, &overflow)
    if overflow or value < 0 or value >= OBJECT:
        return False
    out[0] = <uint32_t>value
    return True


# What a leaf and a bucket hold in memory.
LEAF_BYTES = sizeof(Leaf) + MALLOC_OVERHEAD
BUCKET_BYTES = sizeof(Bucket)
# Bytes one stored page costs the index when its leaf is full, what a limit charges:
# its share of the leaf, and a byte for its leaf's share of the buckets (16 bytes a
# bucket, kept between 3/8 and 3/4 full: 0.7 to 1.3 bytes a page).
PAGE_BYTES = LEAF_BYTES // LEAF_SLOTS + 1
# The largest handle kept in a leaf; larger ints go to the side dict.
MAX_INLINE_HANDLE = OBJECT - 1


cdef class IndexMemory:
    """The bytes held by every page table of one engine, read in O(1); and the last
    `changed` value any of them gave a leaf (the values strictly increase)."""

    cdef readonly long long nbytes
    cdef readonly long long pages
    cdef readonly int64_t changed

    cdef inline int64_t change(self, int64_t stamp) noexcept:
        """The value a store with this stamp gives the leaves it touches."""
        self.changed = stamp if stamp > self.changed else self.changed + 1
        return self.changed


cdef class Entry:
    """One stored page as the index hands it out: its backend handle, its mtime (the
    time of its store, in whole seconds, as nanoseconds) and its leaf's `changed` when
    it was taken out. A copy: changing it changes nothing in the table.

    Two Entries are equal when all three are: an Entry taken before an await equals
    the table's afterwards only if no page of its leaf was stored meanwhile and the
    page's handle is the same (the module's docstring says why the whole leaf).
    `Entry(LOST, 0)` and the like, made by hand, have `changed` 0, which no table
    hands out once anything was stored."""

    cdef public object handle
    cdef public int64_t mtime_ns
    cdef public int64_t changed

    def __init__(self, handle, int64_t mtime_ns, int64_t changed=0):
        self.handle = handle
        self.mtime_ns = mtime_ns
        self.changed = changed

    def __eq__(self, other):
        if not isinstance(other, Entry):
            return NotImplemented
        return (self.changed == (<Entry>other).changed
                and self.mtime_ns == (<Entry>other).mtime_ns
                and self.handle == (<Entry>other).handle)

    __hash__ = None

    def __repr__(self):
        return f"Entry({self.handle!r}, {self.mtime_ns}, {self.changed})"


@cython.no_gc_clear
cdef class PageTable:
    """The pages of one object: index -> Entry, with the dict methods the engine uses
    and batch methods for runs of consecutive pages (the image path)."""

    cdef Bucket* buckets
    cdef uint64_t mask          # buckets - 1; no buckets while the table is empty
    cdef uint64_t leaves
    cdef readonly long long count
    cdef dict objects
    cdef IndexMemory meter

    def __cinit__(self, IndexMemory meter=None):
        self.meter = meter if meter is not None else IndexMemory()
        self.objects = {}

    def __dealloc__(self):
        self._free_all()

    cdef void _free_all(self) noexcept:
        cdef uint64_t i
        if self.buckets != NULL:
            for i in range(self.mask + 1):
                if self.buckets[i].key:
                    free(self.buckets[i].leaf)
            free(self.buckets)
        self.meter.nbytes -= self._nbytes()
        self.meter.pages -= self.count
        self.buckets = NULL
        self.mask = 0
        self.leaves = 0
        self.count = 0

    cdef long long _nbytes(self) noexcept:
        if self.buckets == NULL:
            return 0
        return (<long long>(self.mask + 1) * sizeof(Bucket)
                + <long long>self.leaves * (sizeof(Leaf) + MALLOC_OVERHEAD))

    @property
    def nbytes(self) -> int:
        """Bytes this table holds (leaves and buckets); handles in the side dict aside."""
        return self._nbytes()

    # -- the leaf table ----------------------------------------------------------------

    cdef Leaf* _find(self, uint64_t leafno) noexcept:
        cdef uint64_t key = leafno + 1
        cdef uint64_t i
        if self.buckets == NULL:
            return NULL
        i = mix(key) & self.mask
        while self.buckets[i].key:
            if self.buckets[i].key == key:
                return self.buckets[i].leaf
            i = (i + 1) & self.mask
        return NULL

    cdef int _resize(self, uint64_t size) except -1:
        cdef Bucket* old = self.buckets
        cdef uint64_t old_size = self.mask + 1 if old != NULL else 0
        cdef Bucket* fresh = <Bucket*>calloc(size, sizeof(Bucket))
        cdef uint64_t i, j
        if fresh == NULL:
            raise MemoryError()
        self.meter.nbytes -= self._nbytes()
        for i in range(old_size):
            if old[i].key:
                j = mix(old[i].key) & (size - 1)
                while fresh[j].key:
                    j = (j + 1) & (size - 1)
                fresh[j] = old[i]
        free(old)
        self.buckets = fresh
        self.mask = size - 1
        self.meter.nbytes += self._nbytes()
        return 0

    cdef Leaf* _find_or_add(self, uint64_t leafno) except NULL:
        cdef Leaf* leaf = self._find(leafno)
        cdef uint64_t i
        if leaf != NULL:
            return leaf
        if self.buckets == NULL:
            self._resize(2)
        elif (self.leaves + 1) * 4 > (self.mask + 1) * 3:
            self._resize((self.mask + 1) * 2)
        leaf = <Leaf*>malloc(sizeof(Leaf))
        if leaf == NULL:
            raise MemoryError()
        leaf.present = 0
        leaf.count = 0
        leaf.changed = 0
        i = mix(leafno + 1) & self.mask
        while self.buckets[i].key:
            i = (i + 1) & self.mask
        self.buckets[i].key = leafno + 1
        self.buckets[i].leaf = leaf
        self.leaves += 1
        self.meter.nbytes += sizeof(Leaf) + MALLOC_OVERHEAD
        return leaf

    cdef void _drop_leaf(self, uint64_t leafno) noexcept:
        """Free an empty leaf and close the gap its bucket leaves (backward shift)."""
        cdef uint64_t key = leafno + 1
        cdef uint64_t i = mix(key) & self.mask
        cdef uint64_t j, ideal
        while self.buckets[i].key != key:
            i = (i + 1) & self.mask
        free(self.buckets[i].leaf)
        self.leaves -= 1
        self.meter.nbytes -= sizeof(Leaf) + MALLOC_OVERHEAD
        j = i
        while True:
            j = (j + 1) & self.mask
            if not self.buckets[j].key:
                break
            ideal = mix(self.buckets[j].key) & self.mask
            # Leave it where it is if its ideal bucket lies cyclically in (i, j].
            if (i < ideal <= j) if i <= j else (i < ideal or ideal <= j):
                continue
            self.buckets[i] = self.buckets[j]
            i = j
        self.buckets[i].key = 0
        self.buckets[i].leaf = NULL
        if self.leaves == 0:
            self.meter.nbytes -= self._nbytes()
            free(self.buckets)
            self.buckets = NULL
            self.mask = 0

    # -- one page ----------------------------------------------------------------------

    cdef bint _has(self, uint64_t index) noexcept:
        cdef Leaf* leaf = self._find(index >> LEAF_BITS)
        return leaf != NULL and (leaf.present >> (index & LEAF_MASK)) & 1

    cdef object _handle(self, Leaf* leaf, uint64_t index):
        cdef uint32_t h = leaf.handle[index & LEAF_MASK]
        return self.objects[index] if h == OBJECT else h

    cdef Entry _entry(self, Leaf* leaf, uint64_t index):
        return Entry(self._handle(leaf, index),
                     <int64_t>leaf.mtime[index & LEAF_MASK] * NS, leaf.changed)

    cdef int _set(self, Leaf* leaf, uint64_t index, object handle, uint32_t mtime) except -1:
        """Put a page's handle and mtime into its leaf; the leaf's `changed` is the
        caller's to set (a store gives it a new value, `set_handle` keeps it)."""
        cdef uint32_t bit = (<uint32_t>1) << (index & LEAF_MASK)
        cdef int slot = index & LEAF_MASK
        cdef uint32_t value = 0
        if leaf.present & bit:
            if leaf.handle[slot] == OBJECT:
                del self.objects[index]
        else:
            leaf.present |= bit
            leaf.count += 1
            self.count += 1
            self.meter.pages += 1
        if inline_handle(handle, &value):
            leaf.handle[slot] = value
        else:
            self.objects[index] = handle
            leaf.handle[slot] = OBJECT
        leaf.mtime[slot] = mtime
        return 0

    cdef int _store(self, uint64_t index, object handle, uint32_t mtime,
                    int64_t changed) except -1:
        cdef Leaf* leaf = self._find_or_add(index >> LEAF_BITS)
        self._set(leaf, index, handle, mtime)
        leaf.changed = changed
        return 0

    cdef object _remove(self, uint64_t index, bint want):
        """Take a page out; its Entry if `want`, else its handle; KeyError if absent."""
        cdef Leaf* leaf = self._find(index >> LEAF_BITS)
        cdef uint32_t bit = (<uint32_t>1) << (index & LEAF_MASK)
        cdef int slot = index & LEAF_MASK
        cdef object handle
        if leaf == NULL or not (leaf.present & bit):
            raise KeyError(index)
        if leaf.handle[slot] == OBJECT:
            handle = self.objects.pop(index)
        else:
            handle = leaf.handle[slot]
        result = (Entry(handle, <int64_t>leaf.mtime[slot] * NS, leaf.changed)
                  if want else handle)
        leaf.present &= ~bit
        leaf.count -= 1
        self.count -= 1
        self.meter.pages -= 1
        if leaf.count == 0:
            self._drop_leaf(index >> LEAF_BITS)
        return result

    def __len__(self) -> int:
        return self.count

    def __contains__(self, index) -> bool:
        return 0 <= index <= 0x7FFFFFFFFFFFFFFF and self._has(index)

    def get(self, index, default=None):
        cdef Leaf* leaf
        cdef uint64_t i
        if not 0 <= index <= 0x7FFFFFFFFFFFFFFF:
            return default
        i = index
        leaf = self._find(i >> LEAF_BITS)
        if leaf == NULL or not (leaf.present >> (i & LEAF_MASK)) & 1:
            return default
        return self._entry(leaf, i)

    def __getitem__(self, index):
        entry = self.get(index)
        if entry is None:
            raise KeyError(index)
        return entry

    def __setitem__(self, uint64_t index, Entry entry not None):
        """Put a page back as an Entry holds it (an exclusive get that did not
        complete): its handle and mtime. It counts as a store into its leaf: the leaf's
        `changed` takes a new value, so older Entries of the leaf's pages compare
        unequal, even this one (conservative, never wrong)."""
        self._store(index, entry.handle, seconds(entry.mtime_ns),
                    self.meter.change(entry.changed))

    def __delitem__(self, uint64_t index):
        self._remove(index, False)

    def pop(self, index, *default):
        if len(default) > 1:
            raise TypeError("pop expected at most 2 arguments")
        if default and (not 0 <= index <= 0x7FFFFFFFFFFFFFFF or not self._has(index)):
            return default[0]
        return self._remove(index, True)

    def put(self, uint64_t index, handle, int64_t stamp) -> None:
        """Index a page stored at `stamp` (the engine's, in nanoseconds): its handle,
        its mtime (the stamp in whole seconds), and a new `changed` for its leaf."""
        self._store(index, handle, seconds(stamp), self.meter.change(stamp))

    def set_handle(self, uint64_t index, handle) -> None:
        """Change a page's handle, keeping its mtime and its leaf's `changed` (it moved,
        it was not stored anew: an Entry of a neighbour still compares equal)."""
        cdef Leaf* leaf = self._find(index >> LEAF_BITS)
        if leaf == NULL or not (leaf.present >> (index & LEAF_MASK)) & 1:
            raise KeyError(index)
        self._set(leaf, index, handle, leaf.mtime[index & LEAF_MASK])

    def clear(self) -> None:
        self._free_all()
        self.objects.clear()

    # -- every page, in index order ------------------------------------------------------

    cdef list _leaf_numbers(self):
        cdef uint64_t i
        numbers = []
        if self.buckets != NULL:
            for i in range(self.mask + 1):
                if self.buckets[i].key:
                    numbers.append(self.buckets[i].key - 1)
        numbers.sort()
        return numbers

    def keys(self) -> list:
        cdef Leaf* leaf
        cdef uint64_t leafno
        cdef int slot
        out = []
        for leafno in self._leaf_numbers():
            leaf = self._find(leafno)
            for slot in range(LEAF_SLOTS):
                if (leaf.present >> slot) & 1:
                    out.append((leafno << LEAF_BITS) | slot)
        return out

    def __iter__(self):
        return iter(self.keys())

    def items(self) -> list:
        cdef Leaf* leaf
        cdef uint64_t leafno, index
        cdef int slot
        out = []
        for leafno in self._leaf_numbers():
            leaf = self._find(leafno)
            for slot in range(LEAF_SLOTS):
                if (leaf.present >> slot) & 1:
                    index = (leafno << LEAF_BITS) | slot
                    out.append((index, self._entry(leaf, index)))
        return out

    def values(self) -> list:
        return [entry for _, entry in self.items()]

    def handles(self) -> list:
        """Every page's handle, in index order (for a pool's summary)."""
        cdef Leaf* leaf
        cdef uint64_t leafno
        cdef int slot
        out = []
        for leafno in self._leaf_numbers():
            leaf = self._find(leafno)
            for slot in range(LEAF_SLOTS):
                if (leaf.present >> slot) & 1:
                    out.append(self._handle(leaf, (leafno << LEAF_BITS) | slot))
        return out

    def handle_bytes(self) -> bytes:
        """Every page's handle as native int64s, in no particular order, in one bytes
        object (a pool's summary, without a Python int per page). TypeError if a handle
        is not an int kept in the table (a raw page's bytes, a marker, an int too large)."""
        cdef bytes out
        cdef int64_t* into
        cdef Py_ssize_t n = 0
        cdef uint64_t i
        cdef Leaf* leaf
        cdef int slot
        if self.objects:
            raise TypeError("the table holds handles that are not ints")
        out = PyBytes_FromStringAndSize(NULL, self.count * sizeof(int64_t))
        into = <int64_t*>PyBytes_AS_STRING(out)
        if self.buckets != NULL:
            for i in range(self.mask + 1):
                if self.buckets[i].key:
                    leaf = self.buckets[i].leaf
                    for slot in range(LEAF_SLOTS):
                        if (leaf.present >> slot) & 1:
                            into[n] = leaf.handle[slot]
                            n += 1
        return out

    # -- runs of consecutive pages (an image request) ---------------------------------------

    def run_handles(self, uint64_t first, Py_ssize_t count) -> list:
        """The handles of pages first..first+count-1, -1 where none is stored."""
        cdef Leaf* leaf = NULL
        cdef uint64_t index, leafno = 0
        cdef Py_ssize_t n
        cdef bint have_leaf = False
        out = [-1] * count
        for n in range(count):
            index = first + <uint64_t>n
            if not have_leaf or (index >> LEAF_BITS) != leafno:
                leafno = index >> LEAF_BITS
                leaf = self._find(leafno)
                have_leaf = True
            if leaf != NULL and (leaf.present >> (index & LEAF_MASK)) & 1:
                out[n] = self._handle(leaf, index)
        return out

    def pop_run(self, uint64_t first, Py_ssize_t count) -> list:
        """Take out pages first..first+count-1; the handles of those that were stored."""
        cdef Leaf* leaf
        cdef uint64_t index = first
        cdef uint64_t end = first + <uint64_t>count
        cdef uint64_t stop, leafno
        cdef uint32_t bit
        cdef int slot
        out = []
        if count <= 0:
            return out
        while index < end:
            leafno = index >> LEAF_BITS
            stop = min((leafno + 1) << LEAF_BITS, end)
            leaf = self._find(leafno)
            if leaf != NULL:
                while index < stop:
                    slot = index & LEAF_MASK
                    bit = (<uint32_t>1) << slot
                    if leaf.present & bit:
                        if leaf.handle[slot] == OBJECT:
                            out.append(self.objects.pop(index))
                        else:
                            out.append(leaf.handle[slot])
                        leaf.present &= ~bit
                        leaf.count -= 1
                        self.count -= 1
                        self.meter.pages -= 1
                    index += 1
                if leaf.count == 0:
                    self._drop_leaf(leafno)
            index = stop
        return out

    def put_run(self, uint64_t first, list handles not None, int64_t stamp) -> None:
        """Index pages first..first+len(handles)-1, all stored at `stamp` (one store):
        one mtime, and one new `changed` for every leaf they touch."""
        cdef Py_ssize_t n, count = len(handles)
        cdef uint32_t mtime = seconds(stamp)
        cdef int64_t changed
        cdef uint64_t index
        cdef Leaf* leaf = NULL
        if count == 0:
            return
        changed = self.meter.change(stamp)
        for n in range(count):
            index = first + <uint64_t>n
            if leaf == NULL or (index & LEAF_MASK) == 0:
                leaf = self._find_or_add(index >> LEAF_BITS)
                leaf.changed = changed
            self._set(leaf, index, handles[n], mtime)
