# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The per-page work of the lz4 backend, compiled: compression, same-filled pages,
deduplication and the slab memory that keeps payloads.

Python decides once per request; this module loops over the request's pages with the
GIL released, on both cores when the batch is large (as pyfuse3 and S3QL do their hot
paths in Cython). It is the zsmalloc of tmemfs:

- A payload lives in a slot of its size class (16-byte steps up to a page, as
  zsmalloc's for 4 KiB pages). A class takes memory in chunks of 4 to 32 pages, chosen
  per class to waste the least, carved from 2 MiB arenas reserved with mmap and faulted
  in 16 KiB at a time as their slots are first used. A chunk whose last slot is freed
  goes back to the system at once (a fresh mapping over it), so a flush lowers RSS, not
  a free list.
- A slot's owner is not kept anywhere: a free slot holds the next free slot of its
  chunk in its first 4 bytes (slots are at least 16), and `compact` finds the records
  it moves with one pass over the records. So a page costs its record and nothing per
  slot, and a page-sized payload takes exactly one page.
- A handle is the id of a 16-byte record: 32 bits of the payload's hash, its slot
  (chunk and slot packed in 32 bits), its length and its reference count; its size
  class follows from its length. Identical payloads (equal hashes, confirmed byte for
  byte) and same-filled pages (the word kept in the record's hash and slot fields; no
  payload) share one record, up to MAX_REFS references: a page past that starts a
  record of its own.

The encoding is the one codec.py describes for Redis and the writeback tiers: a
same-filled page is its 8-byte word, a page that compresses worse than the reject
limit is kept raw (page-size bytes), anything else is an lz4 block.

Cold pages are recompressed with zstd (zram's `recompress`, done by itself): a
record's `live_flags` says which codec holds its payload, and whether it is idle
(not loaded or stored since the last recompression sweep visited it, as zram marks
idle slots). A sweep runs in three steps so that the store is only ever changed on
the caller's thread: `recompress_begin` copies a batch of idle lz4 or raw payloads
out (a few hundred microseconds), `RecompressBatch.run` decompresses and recompresses
them with the GIL released and without touching the store (a worker thread), and
`recompress_commit` swaps in each zstd payload that takes a smaller size class, if
the record still holds exactly the payload that was copied and is still idle. A zstd
record keeps the hash of its lz4 payload, so it stays where dedup looks for it; a
dedup hit on it is confirmed by decompressing both and comparing the pages. zstd
never leaves the store: `payload()` of a zstd record gives the lz4 (or raw) payload
it came from, recompressed the same way (lz4 is deterministic), so Redis and the
writeback tiers see the codec's format unchanged.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cython.parallel cimport prange
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset

cdef extern from "lz4.h" nogil:
    int LZ4_compress_default(const char* src, char* dst, int src_size, int dst_capacity)
    int LZ4_decompress_safe(const char* src, char* dst, int compressed_size, int dst_capacity)
    int LZ4_compressBound(int input_size)

cdef extern from "malloc.h" nogil:
    int malloc_trim(size_t pad)

cdef extern from *:
    """
    #ifndef TMEMFS_SOURCE_DIGEST
    #define TMEMFS_SOURCE_DIGEST ""
    #endif
    """
    const char* TMEMFS_SOURCE_DIGEST

#: The digest of the .pyx this module was compiled from (setup.py; tmemfs/build.py).
SOURCE_DIGEST = TMEMFS_SOURCE_DIGEST.decode()

cdef extern from *:
    """
    /* For the _byReference and _advanced calls: a dictionary's bytes are kept once,
       and its compression tables are sized for one page, not for zstd's default of
       an input of unknown size (430 KiB at level 3 against 40 KiB). */
    #define ZSTD_STATIC_LINKING_ONLY
    #include <zstd.h>
    static ZSTD_CDict* tmemfs_page_cdict(const void* dict, size_t size, int level,
                                          size_t page_size) {
        ZSTD_compressionParameters params = ZSTD_getCParams(level, page_size, size);
        return ZSTD_createCDict_advanced(dict, size, ZSTD_dlm_byRef, ZSTD_dct_auto,
                                         params, ZSTD_defaultCMem);
    }
    """

cdef extern from "zstd.h" nogil:
    size_t ZSTD_compressBound(size_t src_size)
    unsigned ZSTD_isError(size_t code)
    ctypedef struct ZSTD_CCtx:
        pass
    ctypedef struct ZSTD_DCtx:
        pass
    size_t ZSTD_compressCCtx(ZSTD_CCtx* cctx, void* dst, size_t dst_capacity,
                             const void* src, size_t src_size, int level)
    size_t ZSTD_decompressDCtx(ZSTD_DCtx* dctx, void* dst, size_t dst_capacity,
                               const void* src, size_t src_size)
    int ZSTD_maxCLevel()
    ctypedef struct ZSTD_CDict:
        pass
    ctypedef struct ZSTD_DDict:
        pass
    ZSTD_CDict* ZSTD_createCDict(const void* dict, size_t dict_size, int level)
    size_t ZSTD_freeCDict(ZSTD_CDict* cdict)
    ZSTD_CDict* page_cdict "tmemfs_page_cdict"(const void* dict, size_t size, int level,
                                               size_t page_size)
    ZSTD_DDict* ZSTD_createDDict_byReference(const void* dict, size_t dict_size)
    size_t ZSTD_freeDDict(ZSTD_DDict* ddict)
    size_t ZSTD_sizeof_DDict(const ZSTD_DDict* ddict)
    size_t ZSTD_sizeof_CDict(const ZSTD_CDict* cdict)
    size_t ZSTD_compress_usingCDict(ZSTD_CCtx* cctx, void* dst, size_t dst_capacity,
                                    const void* src, size_t src_size, const ZSTD_CDict* cdict)
    size_t ZSTD_decompress_usingDDict(ZSTD_DCtx* dctx, void* dst, size_t dst_capacity,
                                      const void* src, size_t src_size, const ZSTD_DDict* ddict)

cdef extern from "zdict.h" nogil:
    size_t ZDICT_trainFromBuffer(void* dict_buffer, size_t dict_capacity,
                                 const void* samples, const size_t* sample_sizes,
                                 unsigned nb_samples)
    unsigned ZDICT_isError(size_t code)

cdef extern from *:
    """
    #include <pthread.h>
    #include <zstd.h>
    /* One zstd context of each kind per thread (OpenMP's, trio's workers, the caller's),
       made on first use and freed when its thread exits. */
    static pthread_key_t tmemfs_cctx_key, tmemfs_dctx_key;
    static pthread_once_t tmemfs_keys_once = PTHREAD_ONCE_INIT;
    static void tmemfs_free_cctx(void* p) { ZSTD_freeCCtx((ZSTD_CCtx*)p); }
    static void tmemfs_free_dctx(void* p) { ZSTD_freeDCtx((ZSTD_DCtx*)p); }
    static void tmemfs_make_keys(void) {
        pthread_key_create(&tmemfs_cctx_key, tmemfs_free_cctx);
        pthread_key_create(&tmemfs_dctx_key, tmemfs_free_dctx);
    }
    static ZSTD_CCtx* tmemfs_cctx(void) {
        pthread_once(&tmemfs_keys_once, tmemfs_make_keys);
        ZSTD_CCtx* c = (ZSTD_CCtx*)pthread_getspecific(tmemfs_cctx_key);
        if (c == NULL && (c = ZSTD_createCCtx()) != NULL)
            pthread_setspecific(tmemfs_cctx_key, c);
        return c;
    }
    static ZSTD_DCtx* tmemfs_dctx(void) {
        pthread_once(&tmemfs_keys_once, tmemfs_make_keys);
        ZSTD_DCtx* d = (ZSTD_DCtx*)pthread_getspecific(tmemfs_dctx_key);
        if (d == NULL && (d = ZSTD_createDCtx()) != NULL)
            pthread_setspecific(tmemfs_dctx_key, d);
        return d;
    }
    """
    ZSTD_CCtx* thread_cctx "tmemfs_cctx"() nogil
    ZSTD_DCtx* thread_dctx "tmemfs_dctx"() nogil

cdef extern from "sys/mman.h" nogil:
    void* mmap(void* addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void* addr, size_t length)
    int madvise(void* addr, size_t length, int advice)
    int PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE, MAP_FIXED
    int MADV_DONTNEED
    void* MAP_FAILED

cdef extern from *:
    """
    #define TMEMFS_NO_SLOT 0x7FFFFFFFu
    #define TMEMFS_NO_RECORD 0xFFFFFFFFu
    """
    const uint32_t NO_SLOT "TMEMFS_NO_SLOT"
    const uint32_t NO_RECORD "TMEMFS_NO_RECORD"

DEF WORD = 8
DEF GRAIN = 16                  # size classes step by this many bytes
DEF ARENA_BYTES = 2 * 1024 * 1024
DEF MIN_CHUNK_PAGES = 4
# Chunks up to 128 KiB: the end a class's slots leave unused in a chunk was 2.0% of
# slot memory on average with chunks of at most 8 pages, 0.17% with 32
# (bench/overhead_measure.py: mapped beyond the payloads at 10^6 pages 62.9 -> 43.5
# B/page). A chunk is faulted in POPULATE_STEP at a time as its slots are first used,
# so the one chunk per class that is filling holds at most that much unused.
DEF MAX_CHUNK_PAGES = 32
DEF POPULATE_STEP = 16384
DEF PARALLEL_MIN = 16           # below this many pages one thread is faster than two
DEF MADV_POPULATE_WRITE = 23    # Linux 5.14+: fault a step of a chunk in at once
# A batch's scratch at least this big is kept for the next batch. malloc maps anything
# over the daemon's mmap threshold (256 KiB) afresh, and under mlockall each of those
# mappings is faulted in and zeroed whole: a 1 MiB write paid some 280 page faults for
# its scratch alone (perf: ~10% of a 1 MiB write's time in faults and clearing).
DEF SPARE_MIN_BYTES = 256 * 1024

# live_flags of a record: the codec of its payload, and the idle mark of the sweep.
DEF CODEC_MASK = 0x0F
DEF CODEC_NATIVE = 0    # lz4, raw or a same-filled word: told apart by length
DEF CODEC_ZSTD = 1      # zstd without a dictionary
DEF CODEC_DICT = 2      # 2 + k: zstd with the store's dictionary k
DEF MAX_DICTS = 14      # the codecs left in CODEC_MASK
DEF IDLE = 0x80         # set by a sweep's visit, cleared by a load or a store
DEF TRIED = 0x40        # zstd did not pay for this payload: the sweeps leave it alone

DEF MAX_REFS = 0xFFFFFF        # what a record's 24-bit reference count holds

cdef extern from *:
    """
    #include <stdint.h>
    /* A kept payload (or same-filled word) and its references, 16 bytes: one per
       distinct page, so each byte here is a byte per page. */
    typedef struct {
        uint32_t hash;          /* low 32 bits of the payload's hash; of a same-filled
                                   page, the low half of its word */
        uint32_t refs : 24;     /* 0: a free record, and `loc` is the next free one */
        uint32_t live_flags : 8;    /* CODEC_* | IDLE | TRIED */
        uint32_t loc;           /* chunk << class's slot_bits | slot; of a same-filled
                                   page, the high half of its word */
        uint16_t length;        /* payload bytes (its size class follows); 0: same-filled */
        uint16_t native_length; /* a zstd record: the length of the payload it replaced */
    } tmemfs_record;
    _Static_assert(sizeof(tmemfs_record) == 16, "a record is 16 bytes");
    """
    ctypedef struct Record "tmemfs_record":
        uint32_t hash
        uint32_t refs
        uint8_t live_flags
        uint32_t loc
        uint16_t length
        uint16_t native_length

# What one kept payload costs beyond its slot: its record and its share of the dedup
# table (kept at most half full: two 4-byte entries per record at least; it doubles
# when half full, so between two and four, and memory_mapped says which).
RECORD_OVERHEAD = sizeof(Record) + 8
#: Size classes step by this many bytes: a payload's slot is its length rounded up to it.
CLASS_STEP = GRAIN
#: References one record holds; one more identical page is kept in a record of its own.
REFS_LIMIT = MAX_REFS


cdef struct Chunk:
    char* base          # NULL while the chunk holds nothing (its memory went back)
    uint32_t used
    uint32_t fresh      # slots below this have been handed out at least once
    uint32_t free_head  # a freed slot to reuse, or NO_SLOT; a free slot's first 4
                        # bytes name the next one
    uint32_t partial    # 1 while listed in its class's partial list


cdef struct SizeClass:
    uint32_t size
    uint32_t chunk_bytes
    uint32_t per_chunk
    uint32_t slot_bits   # a record's loc: chunk << slot_bits | slot
    uint32_t max_chunks  # chunk numbers that fit in the rest of loc's 32 bits
    Chunk* chunks
    uint32_t nchunks
    uint32_t cap_chunks
    uint32_t* partial    # a stack of chunks with free slots
    uint32_t npartial
    uint32_t cap_partial
    uint32_t nsources    # compact(): partial[:nsources] are emptied into the others,
    uint32_t fill        # partial[fill] first, then the ones below it
    uint64_t* sources    # compact(): a bit per chunk, set for those it empties (a bitmap
                         # stays in cache over the records pass; the chunks do not)
    char** arenas
    uint32_t narenas
    uint32_t chunks_per_arena


cdef inline void give_back(char* base, size_t length) noexcept nogil:
    """Return a chunk's memory to the system, keeping its addresses reserved.

    A fresh mapping over the chunk frees its pages even when they are locked (the daemon
    runs under mlockall once an image exists, and MADV_DONTNEED refuses locked pages);
    the new mapping merges back into its arena's, so the mapping count does not grow.
    """
    if mmap(base, length, PROT_READ | PROT_WRITE,
            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0) == MAP_FAILED:
        madvise(base, length, MADV_DONTNEED)


cdef extern from *:
    """
    #define tmemfs_atomic_add(p, n) __atomic_fetch_add((p), (n), __ATOMIC_RELAXED)
    """
    # Loads run on both cores at once (prange): a plain += would lose counts.
    void atomic_add "tmemfs_atomic_add"(long* counter, long n) noexcept nogil


cdef inline size_t populated_bytes(SizeClass* sc, uint32_t slots) noexcept nogil:
    """What a chunk whose first `slots` slots were used has faulted in: whole steps."""
    cdef size_t steps = (<size_t>slots * sc.size + POPULATE_STEP - 1) // POPULATE_STEP
    return min(steps * POPULATE_STEP, <size_t>sc.chunk_bytes)


cdef inline uint64_t hash_bytes(const char* data, int length) noexcept nogil:
    """A 64-bit multiply-xorshift hash; equal hashes are always confirmed with memcmp."""
    cdef uint64_t h = 0x9E3779B97F4A7C15ULL ^ <uint64_t>length
    cdef uint64_t w
    cdef int i = 0
    while i + WORD <= length:
        memcpy(&w, data + i, WORD)
        h = (h ^ w) * 0xFF51AFD7ED558CCDULL
        h ^= h >> 29
        i += WORD
    w = 0
    if i < length:
        memcpy(&w, data + i, length - i)
        h = (h ^ w) * 0xC4CEB9FE1A85EC53ULL
    h ^= h >> 32
    return h


cdef inline bint same_filled(const char* page, int page_size, uint64_t* word) noexcept nogil:
    cdef uint64_t first, w
    cdef int i
    memcpy(&first, page, WORD)
    i = WORD
    while i < page_size:
        memcpy(&w, page + i, WORD)
        if w != first:
            return False
        i += WORD
    word[0] = first
    return True


cdef void encode_page(const char* page, int ps, int limit, char* out, int bound,
                      int32_t* length, uint64_t* hash) noexcept nogil:
    """Same-filled check, then lz4; raw when it compresses worse than `limit`."""
    cdef uint64_t word
    cdef int n
    if same_filled(page, ps, &word):
        length[0] = 0
        hash[0] = word
        return
    n = LZ4_compress_default(page, out, ps, bound)
    # An 8-byte block would read as a same-filled word in the codec's format.
    if n <= 0 or n > limit or n >= ps or n == WORD:
        memcpy(out, page, ps)
        n = ps
    length[0] = n
    hash[0] = hash_bytes(out, n)


cdef class SlabStore


cdef class EncodedBatch:
    """Pages compressed but not yet kept: the engine decides what to admit in between."""

    cdef readonly int count
    cdef readonly int page_size
    cdef int32_t* lengths   # 0: same-filled; page_size: raw; else an lz4 block
    cdef uint64_t* hashes
    cdef char* scratch      # `bound` bytes per page
    cdef size_t scratch_bytes
    cdef int bound
    cdef SlabStore owner    # takes a large scratch back for the next batch

    def __dealloc__(self):
        free(self.lengths)
        free(self.hashes)
        if self.owner is not None and self.scratch_bytes >= SPARE_MIN_BYTES:
            self.owner._take_spare(self.scratch, self.scratch_bytes)
        else:
            free(self.scratch)

    def length(self, int i) -> int:
        """Payload bytes of page i (0 for a same-filled page)."""
        return self.lengths[i]

    def is_same_filled(self, int i) -> bool:
        return self.lengths[i] == 0

    def is_poor(self, int i) -> bool:
        """Whether page i compressed worse than the reject limit and is kept raw."""
        return self.lengths[i] == self.page_size

    def word(self, int i) -> int:
        """The repeated word of a same-filled page."""
        return self.hashes[i]

    def payload(self, int i) -> bytes:
        """Page i in the codec's format (8 bytes for a same-filled page)."""
        cdef uint64_t word
        if self.lengths[i] == 0:
            word = self.hashes[i]
            return PyBytes_FromStringAndSize(<char*>&word, WORD)
        return PyBytes_FromStringAndSize(self.scratch + <size_t>i * self.bound, self.lengths[i])

    def payloads(self) -> list:
        """Every page's payload (`payload`), in one call: a remote store's whole batch."""
        cdef list out = [None] * self.count
        cdef uint64_t word
        cdef int i
        for i in range(self.count):
            if self.lengths[i] == 0:
                word = self.hashes[i]
                out[i] = PyBytes_FromStringAndSize(<char*>&word, WORD)
            else:
                out[i] = PyBytes_FromStringAndSize(self.scratch + <size_t>i * self.bound,
                                                   self.lengths[i])
        return out

    def total_length(self) -> int:
        cdef long total = 0
        cdef int i
        for i in range(self.count):
            total += self.lengths[i]
        return total


cdef int decode_payload(const char* payload, Py_ssize_t length, int ps,
                        char* out) noexcept nogil:
    """One payload in the codec's format into a page (NULL: zeros); 1 if it is corrupt."""
    cdef uint64_t word
    cdef int i
    if payload == NULL:
        memset(out, 0, ps)
        return 0
    if length == WORD:
        memcpy(&word, payload, WORD)
        i = 0
        while i < ps:
            memcpy(out + i, &word, WORD)
            i += WORD
        return 0
    if length == ps:
        memcpy(out, payload, ps)
        return 0
    return 0 if LZ4_decompress_safe(payload, out, <int>length, ps) == ps else 1


def decode_payloads(payloads, int page_size, uint8_t[::1] out not None, int threads=2) -> None:
    """Pages from payloads in the codec's format (Redis's, a writeback tier's), written
    into one buffer, page i at i * page_size; the GIL released, both cores for many.
    A None payload (a page the store did not have: an HMGET reply's hole) is a page
    of zeros."""
    cdef Py_ssize_t n = len(payloads)
    cdef Py_ssize_t i
    cdef int bad = 0
    cdef bytes payload
    cdef object item
    if out.shape[0] < n * page_size:
        raise ValueError("the buffer is too small")
    cdef const char** data = <const char**>malloc(max(n, 1) * sizeof(char*))
    cdef Py_ssize_t* lengths = <Py_ssize_t*>malloc(max(n, 1) * sizeof(Py_ssize_t))
    if data == NULL or lengths == NULL:
        free(data)
        free(lengths)
        raise MemoryError()
    try:
        for i in range(n):
            item = payloads[i]
            if item is None:
                data[i], lengths[i] = NULL, 0
                continue
            payload = item  # the list keeps every payload alive meanwhile
            data[i] = PyBytes_AS_STRING(payload)
            lengths[i] = len(payload)
        if n >= PARALLEL_MIN and threads > 1:
            for i in prange(n, nogil=True, num_threads=threads, schedule="dynamic",
                            chunksize=8):
                bad += decode_payload(data[i], lengths[i], page_size,
                                      <char*>&out[0] + <size_t>i * page_size)
        else:
            with nogil:
                for i in range(n):
                    bad += decode_payload(data[i], lengths[i], page_size,
                                          <char*>&out[0] + <size_t>i * page_size)
    finally:
        free(data)
        free(lengths)
    if bad:
        raise ValueError(f"{bad} corrupt payloads")

cdef inline int slot_size(int length) noexcept nogil:
    return (length + GRAIN - 1) // GRAIN * GRAIN


cdef inline int class_of(int length) noexcept nogil:
    """The size class of a payload of `length` bytes (> 0): records keep no class."""
    return (length + GRAIN - 1) // GRAIN - 1


cdef inline uint64_t record_word(const Record* r) noexcept nogil:
    """The word of a same-filled page's record (it has no slot to locate)."""
    return (<uint64_t>r.loc << 32) | r.hash


# A trained dictionary must save at least this share of plain zstd's slots on the
# pages held out of its training sample, or the batch goes without it.
DICT_MIN_SAVING = 0.01
DEF TRAIN_MIN_PAGES = 16        # fewer than this: no training (the caller asks for more)
DEF PROBE_EVERY = 8             # a batch with a dictionary also tries every 8th page without


cdef class Dictionary:
    """A zstd dictionary trained on the store's own pages, and its decompression tables
    (a DDict, by reference to the bytes this object keeps). Its compression tables are
    made by each batch that uses it and freed after: they are some 400 KiB at level 3,
    six times the dictionary, for a fraction of a millisecond per batch of 256 pages."""

    cdef readonly bytes data
    cdef ZSTD_DDict* ddict

    def __dealloc__(self):
        if self.ddict != NULL:
            ZSTD_freeDDict(self.ddict)

    @property
    def memory(self) -> int:
        """Bytes it holds: the dictionary and its decompression tables."""
        return len(self.data) + ZSTD_sizeof_DDict(self.ddict)


cdef Dictionary make_dictionary(bytes data):
    cdef Dictionary d = Dictionary.__new__(Dictionary)
    d.data = data
    d.ddict = ZSTD_createDDict_byReference(PyBytes_AS_STRING(data), len(data))
    if d.ddict == NULL:
        raise MemoryError("no memory for a zstd dictionary")
    return d


cdef class RecompressBatch:
    """Idle payloads copied out of a store; `run` recompresses them with zstd, in any
    thread, without touching the store; `SlabStore.recompress_commit` swaps them in.

    With a dictionary (the store's current one when the batch was taken, or one `run`
    trains first from the batch's own pages) a page is compressed with it; every
    PROBE_EVERY-th page (every 4th, held out of the sample, when it trained one) is
    compressed without it too, keeps the smaller, and adds both sizes to the probe
    counts, by which the caller sees the dictionary's saving drift."""

    cdef readonly int count
    cdef readonly int level
    #: The sweep reached the last record: every record was visited once since the last.
    cdef readonly bint sweep_done
    cdef bint ran
    cdef int page_size
    cdef uint32_t* recs
    cdef int32_t* lengths       # of the payload copied: page_size for a raw page
    cdef int32_t* out_lengths   # of its zstd frame; 0 where zstd does not save a slot class
    cdef uint8_t* out_dict      # 1 where the frame was made with the dictionary
    cdef char* src              # page_size bytes per page
    cdef char* pages            # page_size bytes per page: the pages decoded
    cdef char* out              # out_bound bytes per page
    cdef int out_bound
    # src, pages and out are one block, the store's spare while a sweep lasts: under
    # the daemon's mlockall a fresh 3 MiB block per batch was faulted in, zeroed and
    # unmapped again, and a sweep cost 30-32 us of daemon CPU a page instead of 22-24.
    cdef char* workspace
    cdef size_t workspace_bytes
    cdef bint committed
    #: The dictionary the pages were compressed with, or None.
    cdef readonly Dictionary dictionary
    #: Its slot in the store; -1 for one this batch trained (or none).
    cdef readonly int dict_slot
    cdef int train_capacity     # > 0: train a dictionary of at most this many bytes first
    cdef double min_saving      # what it must save on the held-out pages
    #: A dictionary was trained and it paid on the held-out pages.
    cdef readonly bint trained
    #: Slot bytes of the probed pages, zstd without and with the dictionary.
    cdef readonly long probe_plain
    cdef readonly long probe_dict

    def __dealloc__(self):
        free(self.recs)
        free(self.lengths)
        free(self.out_lengths)
        free(self.out_dict)
        free(self.workspace)

    def handles(self) -> list:
        """The records copied out, in order."""
        return [<long>self.recs[i] for i in range(self.count)]

    def run(self) -> int:
        """Recompress every page (one thread, the GIL released); how many would shrink."""
        cdef int ps = self.page_size
        cdef int i, good = 0, shrunk = 0
        cdef size_t n, m, trained_size = 0
        cdef char* pages = self.pages
        cdef uint8_t* ok = NULL
        cdef char* sample = NULL
        cdef size_t* sizes = NULL
        cdef char* dict_buffer = NULL
        cdef int every = PROBE_EVERY
        cdef ZSTD_CCtx* cctx
        cdef const ZSTD_CDict* cdict = NULL
        if self.committed:
            raise ValueError("the batch was committed: its pages went back to the store")
        ok = <uint8_t*>calloc(max(self.count, 1), 1)
        try:
            if ok == NULL:
                raise MemoryError()
            with nogil:
                for i in range(self.count):
                    if self.lengths[i] == ps:
                        memcpy(pages + <size_t>i * ps, self.src + <size_t>i * ps, ps)
                    elif LZ4_decompress_safe(self.src + <size_t>i * ps, pages + <size_t>i * ps,
                                             self.lengths[i], ps) != ps:
                        continue
                    ok[i] = 1
                    good += 1
            if self.train_capacity and good >= TRAIN_MIN_PAGES:
                # Every 4th page is held out of the sample, to judge the dictionary by.
                sample = <char*>malloc(<size_t>good * ps)
                sizes = <size_t*>malloc(good * sizeof(size_t))
                dict_buffer = <char*>malloc(self.train_capacity)
                if sample == NULL or sizes == NULL or dict_buffer == NULL:
                    raise MemoryError()
                with nogil:
                    m = 0
                    for i in range(self.count):
                        if ok[i] and i % 4:
                            memcpy(sample + m * ps, pages + <size_t>i * ps, ps)
                            sizes[m] = ps
                            m += 1
                    trained_size = ZDICT_trainFromBuffer(dict_buffer, self.train_capacity,
                                                         sample, sizes, <unsigned>m)
                if not ZDICT_isError(trained_size):
                    self.dictionary = make_dictionary(
                        PyBytes_FromStringAndSize(dict_buffer, trained_size))
                    self.dict_slot = -1
                    every = 4
            if self.dictionary is not None:
                cdict = page_cdict(PyBytes_AS_STRING(self.dictionary.data),
                                   len(self.dictionary.data), self.level, ps)
                if cdict == NULL:
                    raise MemoryError("no memory for a zstd dictionary")
            with nogil:
                cctx = thread_cctx()
            if cctx == NULL:
                raise MemoryError("no memory for a zstd context")
            with nogil:
                if self.train_capacity and cdict != NULL:
                    # Judge the new dictionary on the held-out pages first.
                    for i in range(0, self.count, 4):
                        if ok[i]:
                            self._compress(i, pages + <size_t>i * ps, cctx, cdict, True)
                    if self.probe_dict > self.probe_plain * (1.0 - self.min_saving):
                        ZSTD_freeCDict(<ZSTD_CDict*>cdict)
                        cdict = NULL
                    else:
                        self.trained = True
                for i in range(self.count):
                    if not ok[i] or (self.trained and i % 4 == 0):
                        continue    # corrupt (left alone), or judged above
                    self._compress(i, pages + <size_t>i * ps, cctx, cdict,
                                   cdict != NULL and i % every == 0)
            if not self.trained and self.dict_slot < 0:
                # A dictionary trained here that did not pay: no page used it.
                self.dictionary = None
                self.dict_slot = -1
                for i in range(self.count):
                    self.out_dict[i] = 0
            for i in range(self.count):
                shrunk += self.out_lengths[i] != 0
        finally:
            if cdict != NULL:
                ZSTD_freeCDict(<ZSTD_CDict*>cdict)
            free(ok)
            free(sample)
            free(sizes)
            free(dict_buffer)
        self.ran = True
        return shrunk

    cdef void _compress(self, int i, const char* page, ZSTD_CCtx* cctx,
                        const ZSTD_CDict* cdict, bint probe) noexcept nogil:
        """Page i into its zstd frame, with the dictionary if there is one; kept only
        where it takes a smaller slot (a slot is what memory holds)."""
        cdef char* out = self.out + <size_t>i * self.out_bound
        cdef size_t n, plain
        cdef int ps = self.page_size
        self.out_lengths[i] = 0
        self.out_dict[i] = 0
        if cdict == NULL or probe:
            n = ZSTD_compressCCtx(cctx, out, self.out_bound, page, ps, self.level)
            if ZSTD_isError(n):
                return
        if cdict != NULL:
            if probe:
                plain = n
                n = ZSTD_compress_usingCDict(cctx, out, self.out_bound, page, ps, cdict)
                if ZSTD_isError(n):
                    return
                self.probe_plain += slot_size(<int>min(plain, <size_t>ps))
                self.probe_dict += slot_size(<int>min(n, <size_t>ps))
                if plain < n:
                    # Without the dictionary is smaller: make that frame again.
                    n = ZSTD_compressCCtx(cctx, out, self.out_bound, page, ps, self.level)
                    if ZSTD_isError(n):
                        return
                else:
                    self.out_dict[i] = 1
            else:
                n = ZSTD_compress_usingCDict(cctx, out, self.out_bound, page, ps, cdict)
                if ZSTD_isError(n):
                    return
                self.out_dict[i] = 1
        if slot_size(<int>n) < slot_size(self.lengths[i]):
            self.out_lengths[i] = <int32_t>n
        else:
            self.out_dict[i] = 0


cdef class SlabStore:
    """Compressed pages in size-class slabs, deduplicated, addressed by record handles."""

    cdef readonly int page_size
    cdef readonly int reject_limit
    cdef int threads
    cdef SizeClass* classes
    cdef int nclasses
    cdef Record* records
    cdef uint32_t nrecords      # records ever handed out (ids below this exist)
    cdef uint32_t cap_records
    cdef uint32_t free_record
    cdef uint32_t refs_cap      # MAX_REFS; lower only in tests (_limit_refs)
    cdef uint32_t* table        # dedup: record id + 1, 0 for empty; linear probing
    cdef uint32_t table_mask
    cdef uint32_t table_used
    # Gauges, kept as things change so that reading them costs nothing.
    cdef readonly long live_records
    cdef readonly long payload_bytes     # compressed bytes kept, each payload once
    cdef readonly long slot_bytes        # bytes of the slots holding them
    cdef readonly long chunk_bytes       # memory of chunks that hold something
    cdef readonly long same_filled_pages
    cdef readonly long dedup_pages       # pages whose payload another page shares too
    cdef readonly long payload_pages     # pages that have a payload (not same-filled)
    cdef readonly long arena_count
    cdef long word_records              # records of same-filled pages (a few words)
    # Recompression: pages whose payload zstd holds, its bytes, and what it saves.
    cdef readonly long recompressed_pages
    cdef readonly long zstd_payload_bytes
    cdef readonly long recompress_saved_bytes   # compressed bytes: lz4's less zstd's
    # Loads of pages held in zstd: recompressed pages that came back (an event count;
    # the sweep backs off when most of what it recompresses does).
    cdef readonly long recompressed_loads
    cdef uint32_t sweep_cursor          # the next record a sweep visits
    # Dictionaries: slot k's pages have codec CODEC_DICT + k. A slot is given back once
    # no record uses it and it is not the current one (the one new batches use).
    cdef list dictionaries              # Dictionary or None per slot
    cdef ZSTD_DDict* ddicts[MAX_DICTS]  # theirs, for loads with the GIL released
    cdef long dict_records[MAX_DICTS]
    cdef uint32_t dict_dead             # slots to give back (found with the GIL released)
    #: The slot of the dictionary new batches use; -1 for none.
    cdef readonly int current_dict
    cdef readonly long dict_pages       # pages held in zstd with a dictionary
    cdef readonly long dict_payload_bytes
    cdef readonly long dictionary_bytes     # the dictionaries and their tables
    cdef char* scratch                  # two pages, for the caller's thread only
    cdef char* spare                    # the last large batch scratch, for the next one
    cdef size_t spare_bytes
    cdef char* recompress_spare         # the last recompression batch's workspace
    cdef size_t recompress_spare_bytes

    def __cinit__(self, int page_size, int reject_limit, int threads=2):
        cdef int c
        cdef uint32_t size, pages, best_pages, per, most_pages
        cdef double waste, best_waste
        if page_size < 64 or page_size % GRAIN or page_size > 65535:
            raise ValueError("page size must be a multiple of 16 from 64 to 65520")
        self.page_size = page_size
        self.refs_cap = MAX_REFS
        self.reject_limit = min(reject_limit, page_size)
        self.threads = max(1, threads)
        self.nclasses = page_size // GRAIN
        self.classes = <SizeClass*>calloc(self.nclasses, sizeof(SizeClass))
        if self.classes == NULL:
            raise MemoryError()
        for c in range(self.nclasses):
            size = (c + 1) * GRAIN
            best_pages, best_waste = MIN_CHUNK_PAGES, 2.0
            # From MIN_CHUNK_PAGES (a chunk is one madvise to fault in: a page-sized class
            # in 1-page chunks made keep_all 10% slower) up to MAX_CHUNK_PAGES, or as many
            # as one slot takes (the classes of a page size above 32 KiB).
            most_pages = max(MAX_CHUNK_PAGES, (size + 4095) // 4096)
            for pages in range(MIN_CHUNK_PAGES, most_pages + 1):
                per = (pages * 4096) // size
                if per == 0:
                    continue
                waste = 1.0 - <double>(per * size) / (pages * 4096)
                if waste < best_waste - 0.005:
                    best_pages, best_waste = pages, waste
            per = (best_pages * 4096) // size
            self.classes[c].size = size
            self.classes[c].chunk_bytes = best_pages * 4096
            self.classes[c].per_chunk = per
            self.classes[c].chunks_per_arena = ARENA_BYTES // (best_pages * 4096)
            # Just the bits the class's slot numbers need, so every class has room in
            # loc for at least 2^31 slots (more than records there can be).
            self.classes[c].slot_bits = 1
            while (1u << self.classes[c].slot_bits) < per:
                self.classes[c].slot_bits += 1
            self.classes[c].max_chunks = 1u << (32 - self.classes[c].slot_bits)
        self.free_record = NO_RECORD
        self.dictionaries = [None] * MAX_DICTS
        self.current_dict = -1
        self.scratch = <char*>malloc(2 * <size_t>page_size + LZ4_compressBound(page_size))
        if self.scratch == NULL or not self._resize_table(1024):
            raise MemoryError()

    def __dealloc__(self):
        cdef int c, a
        if self.classes != NULL:
            for c in range(self.nclasses):
                for a in range(self.classes[c].narenas):
                    if self.classes[c].arenas[a] != NULL:
                        munmap(self.classes[c].arenas[a], ARENA_BYTES)
                free(self.classes[c].arenas)
                free(self.classes[c].chunks)
                free(self.classes[c].partial)
            free(self.classes)
        free(self.records)
        free(self.table)
        free(self.scratch)
        free(self.spare)
        free(self.recompress_spare)

    cdef void _take_spare(self, char* scratch, size_t nbytes) noexcept:
        """Keep a finished batch's scratch (the larger of it and the one kept)."""
        if self.spare != NULL and self.spare_bytes >= nbytes:
            free(scratch)
            return
        free(self.spare)
        self.spare, self.spare_bytes = scratch, nbytes

    # -- encoding: many pages, the GIL released -----------------------------------------

    def encode(self, const uint8_t[::1] pages not None) -> EncodedBatch:
        """Compress whole pages from one buffer (a FUSE request's, say) in one call."""
        cdef int ps = self.page_size
        if pages.shape[0] % ps:
            raise ValueError("the buffer must hold whole pages")
        cdef EncodedBatch batch = EncodedBatch.__new__(EncodedBatch)
        cdef int n = pages.shape[0] // ps
        cdef int i
        batch.count = n
        batch.page_size = ps
        batch.bound = (LZ4_compressBound(ps) + 7) // 8 * 8
        batch.lengths = <int32_t*>malloc(max(n, 1) * sizeof(int32_t))
        batch.hashes = <uint64_t*>malloc(max(n, 1) * sizeof(uint64_t))
        batch.scratch_bytes = max(n, 1) * <size_t>batch.bound
        if batch.scratch_bytes >= SPARE_MIN_BYTES:
            batch.owner = self
            if self.spare != NULL and self.spare_bytes >= batch.scratch_bytes:
                batch.scratch, batch.scratch_bytes = self.spare, self.spare_bytes
                self.spare, self.spare_bytes = NULL, 0
        if batch.scratch == NULL:
            batch.scratch = <char*>malloc(batch.scratch_bytes)
        if batch.lengths == NULL or batch.hashes == NULL or batch.scratch == NULL:
            raise MemoryError()
        cdef const char* src = <const char*>&pages[0] if n else NULL
        cdef int limit = self.reject_limit
        cdef int bound = batch.bound
        cdef char* scratch = batch.scratch
        cdef int32_t* lengths = batch.lengths
        cdef uint64_t* hashes = batch.hashes
        if n >= PARALLEL_MIN and self.threads > 1:
            for i in prange(n, nogil=True, num_threads=self.threads, schedule="dynamic", chunksize=8):
                encode_page(src + <size_t>i * ps, ps, limit, scratch + <size_t>i * bound,
                            bound, &lengths[i], &hashes[i])
        else:
            with nogil:
                for i in range(n):
                    encode_page(src + <size_t>i * ps, ps, limit, scratch + <size_t>i * bound,
                                bound, &lengths[i], &hashes[i])
        return batch

    def encode_payload(self, bytes payload not None) -> EncodedBatch:
        """A batch of one page from a payload in the codec's format (a tier's copy)."""
        cdef EncodedBatch batch = EncodedBatch.__new__(EncodedBatch)
        cdef Py_ssize_t n = len(payload)
        cdef uint64_t word
        batch.count = 1
        batch.page_size = self.page_size
        batch.bound = (LZ4_compressBound(self.page_size) + 7) // 8 * 8
        batch.lengths = <int32_t*>malloc(sizeof(int32_t))
        batch.hashes = <uint64_t*>malloc(sizeof(uint64_t))
        batch.scratch = <char*>malloc(batch.bound)
        if batch.lengths == NULL or batch.hashes == NULL or batch.scratch == NULL:
            raise MemoryError()
        if n == WORD:
            memcpy(&word, PyBytes_AS_STRING(payload), WORD)
            batch.lengths[0] = 0
            batch.hashes[0] = word
        elif 0 < n <= self.page_size:
            memcpy(batch.scratch, PyBytes_AS_STRING(payload), n)
            batch.lengths[0] = n
            batch.hashes[0] = hash_bytes(batch.scratch, n)
        else:
            raise ValueError(f"a payload of {n} bytes is not a page's")
        return batch

    # -- keeping: the allocator, one thread ---------------------------------------------

    def keep(self, EncodedBatch batch, int i) -> int:
        """Keep page i of a batch; its handle. Identical payloads share a record."""
        cdef uint32_t rec
        if i < 0 or i >= batch.count:
            raise IndexError(i)
        with nogil:
            rec = self._keep_one(batch.scratch + <size_t>i * batch.bound,
                                 batch.lengths[i], batch.hashes[i])
        if rec == NO_RECORD:
            raise MemoryError("no memory for a slab chunk")
        return rec

    def keep_all(self, EncodedBatch batch, const uint8_t[::1] wanted=None) -> list:
        """Keep every page of a batch (or those `wanted` marks); handles, -1 where not."""
        cdef int n = batch.count
        cdef int i, done = 0
        cdef bint marked = wanted is not None
        cdef const uint8_t* marks = NULL
        if marked:
            if wanted.shape[0] != n:
                raise ValueError("one mark per page")
            if n:
                marks = &wanted[0]
        cdef uint32_t* out = <uint32_t*>malloc(max(n, 1) * sizeof(uint32_t))
        if out == NULL:
            raise MemoryError()
        try:
            with nogil:
                for i in range(n):
                    done = i + 1
                    if marked and not marks[i]:
                        out[i] = NO_RECORD
                        continue
                    out[i] = self._keep_one(batch.scratch + <size_t>i * batch.bound,
                                            batch.lengths[i], batch.hashes[i])
                    if out[i] == NO_RECORD:
                        done = i
                        break
            if done < n:
                for i in range(done):
                    if out[i] != NO_RECORD:
                        self._release_one(out[i])
                raise MemoryError("no memory for a slab chunk")
            return [-1 if out[i] == NO_RECORD else <long>out[i] for i in range(n)]
        finally:
            free(out)

    cdef uint32_t _keep_one(self, const char* payload, int length, uint64_t hash) noexcept nogil:
        cdef uint32_t hash32 = <uint32_t>hash
        cdef uint32_t pos = hash32 & self.table_mask
        cdef uint32_t rec
        cdef Record* r
        while self.table[pos]:
            rec = self.table[pos] - 1
            r = &self.records[rec]
            # A record whose count is full is passed over: the page gets a record of its
            # own (put after it in the probe order, where the next such page finds it).
            if (r.hash == hash32 and r.refs < self.refs_cap
                    and self._same_payload(r, payload, length, hash)):
                r.refs += 1
                r.live_flags &= ~IDLE
                if length == 0:
                    self.same_filled_pages += 1
                else:
                    self.payload_pages += 1
                    self.dedup_pages += 2 if r.refs == 2 else 1
                    if r.live_flags & CODEC_MASK != CODEC_NATIVE:
                        self.recompressed_pages += 1
                    if r.live_flags & CODEC_MASK >= CODEC_DICT:
                        self.dict_pages += 1
                return rec
            pos = (pos + 1) & self.table_mask
        rec = self._new_record()
        if rec == NO_RECORD:
            return NO_RECORD
        r = &self.records[rec]
        r.hash = hash32
        r.refs = 1
        r.length = length
        r.live_flags = CODEC_NATIVE
        r.native_length = 0
        if length:
            if not self._alloc_slot(rec, length):
                r.refs = 0
                r.loc = self.free_record
                self.free_record = rec
                return NO_RECORD
            memcpy(self._slot_ptr(r), payload, length)
            self.payload_bytes += length
            self.payload_pages += 1
        else:
            r.loc = <uint32_t>(hash >> 32)
            self.same_filled_pages += 1
            self.word_records += 1
        self.live_records += 1
        self.table[pos] = rec + 1
        self.table_used += 1
        if self.table_used * 2 > self.table_mask:
            self._resize_table((self.table_mask + 1) * 2)
        return rec

    cdef bint _same_payload(self, Record* r, const char* payload, int length,
                            uint64_t hash) noexcept nogil:
        """Whether a record (of an equal hash) holds this payload, confirmed byte for byte
        (a same-filled page by its whole word, `hash`).

        A zstd record is compared as pages: its payload decompressed against the given
        one decoded (raw, or an lz4 block)."""
        cdef int ps = self.page_size
        cdef char* page = self.scratch
        cdef char* other = self.scratch + ps
        if r.live_flags & CODEC_MASK == CODEC_NATIVE:
            if r.length != length:
                return False
            if length == 0:
                return record_word(r) == hash
            return memcmp(self._slot_ptr(r), payload, length) == 0
        if length == 0 or not self._unzstd(r, page):
            return False
        if length == ps:
            return memcmp(page, payload, ps) == 0
        return (LZ4_decompress_safe(payload, other, length, ps) == ps
                and memcmp(page, other, ps) == 0)

    cdef bint _unzstd(self, Record* r, char* out) noexcept nogil:
        """A zstd record's page into out (with its dictionary, if it has one)."""
        cdef int ps = self.page_size
        cdef int k = (r.live_flags & CODEC_MASK) - CODEC_DICT
        cdef ZSTD_DCtx* dctx = thread_dctx()
        if dctx == NULL:
            return False
        if k < 0:
            return ZSTD_decompressDCtx(dctx, out, ps, self._slot_ptr(r), r.length) == <size_t>ps
        if self.ddicts[k] == NULL:
            return False
        return ZSTD_decompress_usingDDict(dctx, out, ps, self._slot_ptr(r), r.length,
                                          self.ddicts[k]) == <size_t>ps

    cdef uint32_t _new_record(self) noexcept nogil:
        cdef uint32_t rec, cap
        cdef Record* grown
        if self.free_record != NO_RECORD:
            rec = self.free_record
            self.free_record = self.records[rec].loc
            return rec
        if self.nrecords == self.cap_records:
            cap = max(1024, self.cap_records + self.cap_records // 2)
            grown = <Record*>realloc(self.records, cap * sizeof(Record))
            if grown == NULL:
                return NO_RECORD
            self.records, self.cap_records = grown, cap
        rec = self.nrecords
        self.nrecords += 1
        return rec

    cdef inline char* _slot_ptr(self, Record* r) noexcept nogil:
        cdef SizeClass* sc = &self.classes[class_of(r.length)]
        cdef uint32_t slot = r.loc & ((1u << sc.slot_bits) - 1)
        return sc.chunks[r.loc >> sc.slot_bits].base + <size_t>slot * sc.size

    cdef bint _alloc_slot(self, uint32_t rec, int length) noexcept nogil:
        cdef SizeClass* sc = &self.classes[class_of(length)]
        cdef uint32_t chunk, slot
        cdef Chunk* ch
        while True:
            if sc.npartial == 0:
                if not self._new_chunk(sc):
                    return False
            chunk = sc.partial[sc.npartial - 1]
            ch = &sc.chunks[chunk]
            if ch.used < sc.per_chunk:
                break
            sc.npartial -= 1
            ch.partial = 0
        if ch.base == NULL and not self._populate(sc, chunk):
            return False
        slot = self._take_slot(sc, ch)
        ch.used += 1
        if ch.used == sc.per_chunk:
            sc.npartial -= 1
            ch.partial = 0
        self.records[rec].loc = chunk << sc.slot_bits | slot
        self.slot_bytes += sc.size
        return True

    cdef inline uint32_t _take_slot(self, SizeClass* sc, Chunk* ch) noexcept nogil:
        """A slot of a chunk with room: the last one freed, else one never used."""
        cdef uint32_t slot
        if ch.free_head != NO_SLOT:
            slot = ch.free_head
            memcpy(&ch.free_head, ch.base + <size_t>slot * sc.size, 4)
        else:
            slot = ch.fresh
            ch.fresh += 1
            self._populate_to(sc, ch)
        return slot

    cdef inline size_t _populated(self, SizeClass* sc, Chunk* ch) noexcept nogil:
        """The bytes of a chunk faulted in: its slots ever used, in whole steps."""
        return populated_bytes(sc, ch.fresh)

    cdef inline void _populate_to(self, SizeClass* sc, Chunk* ch) noexcept nogil:
        """Fault in what the chunk's newest slot needs beyond the steps its earlier slots
        faulted in: one call a step instead of one fault per page touched."""
        cdef size_t have = populated_bytes(sc, ch.fresh - 1)
        cdef size_t want = populated_bytes(sc, ch.fresh)
        if want > have:
            madvise(ch.base + have, want - have, MADV_POPULATE_WRITE)
            self.chunk_bytes += want - have

    cdef inline void _put_slot(self, SizeClass* sc, Chunk* ch, uint32_t slot) noexcept nogil:
        """A slot back on its chunk's free list (its payload is no longer needed)."""
        memcpy(ch.base + <size_t>slot * sc.size, &ch.free_head, 4)
        ch.free_head = slot

    cdef bint _new_chunk(self, SizeClass* sc) noexcept nogil:
        """A chunk number for the class (its memory is taken when first used)."""
        cdef uint32_t cap
        cdef Chunk* grown
        cdef char** arenas
        cdef void* arena
        cdef uint32_t a = sc.nchunks // sc.chunks_per_arena
        if sc.nchunks >= sc.max_chunks:
            return False        # no chunk number left in a record's loc: no memory
        if a >= sc.narenas:
            arena = mmap(NULL, ARENA_BYTES, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
            if arena == MAP_FAILED:
                return False
            arenas = <char**>realloc(sc.arenas, (sc.narenas + 1) * sizeof(char*))
            if arenas == NULL:
                munmap(arena, ARENA_BYTES)
                return False
            sc.arenas = arenas
            sc.arenas[sc.narenas] = <char*>arena
            sc.narenas += 1
            self.arena_count += 1
        if sc.nchunks == sc.cap_chunks:
            cap = max(16, sc.cap_chunks * 2)
            grown = <Chunk*>realloc(sc.chunks, cap * sizeof(Chunk))
            if grown == NULL:
                return False
            sc.chunks, sc.cap_chunks = grown, cap
        memset(&sc.chunks[sc.nchunks], 0, sizeof(Chunk))
        sc.chunks[sc.nchunks].free_head = NO_SLOT
        if not self._push_partial(sc, sc.nchunks):
            return False
        sc.nchunks += 1
        return True

    cdef bint _push_partial(self, SizeClass* sc, uint32_t chunk) noexcept nogil:
        cdef uint32_t cap
        cdef uint32_t* grown
        if sc.npartial == sc.cap_partial:
            cap = max(16, sc.cap_partial * 2)
            grown = <uint32_t*>realloc(sc.partial, cap * sizeof(uint32_t))
            if grown == NULL:
                return False
            sc.partial, sc.cap_partial = grown, cap
        sc.partial[sc.npartial] = chunk
        sc.npartial += 1
        sc.chunks[chunk].partial = 1
        return True

    cdef bint _populate(self, SizeClass* sc, uint32_t chunk) noexcept nogil:
        cdef char* base = (sc.arenas[chunk // sc.chunks_per_arena]
                           + <size_t>(chunk % sc.chunks_per_arena) * sc.chunk_bytes)
        # Its memory is faulted in step by step as slots are first taken (_take_slot).
        sc.chunks[chunk].base = base
        sc.chunks[chunk].used = 0
        sc.chunks[chunk].fresh = 0
        sc.chunks[chunk].free_head = NO_SLOT
        return True

    # -- release -------------------------------------------------------------------------

    def release(self, long handle) -> None:
        """Drop one reference; the payload goes when its last page does."""
        self._check(handle)
        self._release_one(<uint32_t>handle)
        if self.dict_dead:
            self._reap_dictionaries()

    def release_many(self, handles) -> None:
        cdef long h
        for h in handles:
            self._check(h)
            self._release_one(<uint32_t>h)
        if self.dict_dead:
            self._reap_dictionaries()

    cdef void _reap_dictionaries(self):
        """Give back the dictionaries no record uses any more (nor new batches)."""
        cdef int k
        cdef Dictionary d
        for k in range(MAX_DICTS):
            if self.dict_dead & (1u << k):
                d = self.dictionaries[k]
                if d is not None:
                    self.dictionary_bytes -= d.memory
                self.dictionaries[k] = None
                self.ddicts[k] = NULL
        self.dict_dead = 0

    cdef int _install_dictionary(self, Dictionary d):
        """Put a newly trained dictionary in a free slot and make it the current one;
        its slot, or -1 when every slot is still in use."""
        cdef int k, old = self.current_dict
        for k in range(MAX_DICTS):
            if self.dictionaries[k] is None:
                break
        else:
            return -1
        self.dictionaries[k] = d
        self.ddicts[k] = d.ddict
        self.dict_records[k] = 0
        self.dictionary_bytes += d.memory
        self.current_dict = k
        if old >= 0 and self.dict_records[old] == 0:
            self.dict_dead |= 1u << old
            self._reap_dictionaries()
        return k

    def dictionary_slots(self) -> list:
        """(slot, records using it, its bytes) of each dictionary kept."""
        if self.dict_dead:
            self._reap_dictionaries()
        return [(k, self.dict_records[k], len((<Dictionary>d).data))
                for k, d in enumerate(self.dictionaries) if d is not None]

    cdef inline void _check(self, long handle) except *:
        if handle < 0 or handle >= self.nrecords or self.records[handle].refs == 0:
            raise KeyError(handle)

    cdef void _release_one(self, uint32_t rec) noexcept nogil:
        cdef Record* r = &self.records[rec]
        r.refs -= 1
        if r.length == 0:
            self.same_filled_pages -= 1
        else:
            self.payload_pages -= 1
            if r.refs >= 1:
                self.dedup_pages -= 2 if r.refs == 1 else 1
        cdef int codec = r.live_flags & CODEC_MASK
        if codec != CODEC_NATIVE:
            self.recompressed_pages -= 1
        if codec >= CODEC_DICT:
            self.dict_pages -= 1
        if r.refs:
            return
        self._unindex(rec)
        if codec != CODEC_NATIVE:
            self.zstd_payload_bytes -= r.length
            self.recompress_saved_bytes -= r.native_length - r.length
        if codec >= CODEC_DICT:
            self.dict_payload_bytes -= r.length
            self.dict_records[codec - CODEC_DICT] -= 1
            if (self.dict_records[codec - CODEC_DICT] == 0
                    and codec - CODEC_DICT != self.current_dict):
                self.dict_dead |= 1u << (codec - CODEC_DICT)
        if r.length:
            self.payload_bytes -= r.length
            self._free_slot(r)
        else:
            self.word_records -= 1
        self.live_records -= 1
        r.loc = self.free_record
        self.free_record = rec

    cdef void _unindex(self, uint32_t rec) noexcept nogil:
        """Remove a record from the dedup table (backward-shift deletion, no tombstones)."""
        cdef uint32_t mask = self.table_mask
        cdef uint32_t pos = <uint32_t>self.records[rec].hash & mask
        cdef uint32_t nxt, home
        while self.table[pos] != rec + 1:
            pos = (pos + 1) & mask
        nxt = (pos + 1) & mask
        while self.table[nxt]:
            home = <uint32_t>self.records[self.table[nxt] - 1].hash & mask
            # Move the entry back if `pos` lies on its probe path from `home`.
            if ((nxt - home) & mask) >= ((nxt - pos) & mask):
                self.table[pos] = self.table[nxt]
                pos = nxt
            nxt = (nxt + 1) & mask
        self.table[pos] = 0
        self.table_used -= 1

    cdef void _empty_chunk(self, SizeClass* sc, Chunk* ch) noexcept nogil:
        """A chunk's last slot went: its memory goes back to the system now, not to a
        free list, and the chunk starts afresh when it is used again."""
        cdef size_t populated = self._populated(sc, ch)
        give_back(ch.base, populated)
        ch.base = NULL
        ch.fresh = 0
        ch.free_head = NO_SLOT
        self.chunk_bytes -= populated

    cdef void _free_slot(self, Record* r) noexcept nogil:
        cdef SizeClass* sc = &self.classes[class_of(r.length)]
        cdef uint32_t chunk = r.loc >> sc.slot_bits
        cdef uint32_t slot = r.loc & ((1u << sc.slot_bits) - 1)
        cdef Chunk* ch = &sc.chunks[chunk]
        self._put_slot(sc, ch, slot)
        ch.used -= 1
        self.slot_bytes -= sc.size
        if ch.used == 0:
            self._empty_chunk(sc, ch)
        if not ch.partial:
            self._push_partial(sc, chunk)

    # -- loading -------------------------------------------------------------------------

    def load_into(self, handles, uint8_t[::1] out not None) -> None:
        """Decompress pages into one buffer, page i at i * page_size; -1 gives zeros."""
        cdef int ps = self.page_size
        cdef int n = len(handles)
        cdef int i
        cdef long h
        cdef int bad = 0
        if out.shape[0] < <Py_ssize_t>n * ps:
            raise ValueError("the buffer is too small")
        cdef uint32_t* recs = <uint32_t*>malloc(max(n, 1) * sizeof(uint32_t))
        if recs == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                h = handles[i]
                if h != -1:
                    self._check(h)
                recs[i] = NO_RECORD if h == -1 else <uint32_t>h
            if n >= PARALLEL_MIN and self.threads > 1:
                for i in prange(n, nogil=True, num_threads=self.threads, schedule="dynamic", chunksize=8):
                    bad += self._load_one(recs[i], <char*>&out[0] + <size_t>i * ps)
            else:
                with nogil:
                    for i in range(n):
                        bad += self._load_one(recs[i], <char*>&out[0] + <size_t>i * ps)
        finally:
            free(recs)
        if bad:
            raise ValueError(f"{bad} corrupt payloads")

    def load(self, long handle) -> bytes:
        """One page."""
        cdef bytes page = PyBytes_FromStringAndSize(NULL, self.page_size)
        self._check(handle)
        if self._load_one(<uint32_t>handle, PyBytes_AS_STRING(page)):
            raise ValueError("corrupt payload")
        return page

    cdef int _load_one(self, uint32_t rec, char* out) noexcept nogil:
        cdef int ps = self.page_size
        cdef Record* r
        cdef uint64_t word
        cdef int i
        if rec == NO_RECORD:
            memset(out, 0, ps)
            return 0
        r = &self.records[rec]
        if r.live_flags & IDLE:
            # A load makes the page hot again (written only when it changes, so loads
            # of a shared record from two threads agree).
            r.live_flags &= ~IDLE
        if r.length == 0:
            word = record_word(r)
            i = 0
            while i < ps:
                memcpy(out + i, &word, WORD)
                i += WORD
            return 0
        if r.live_flags & CODEC_MASK != CODEC_NATIVE:
            # A loaded page stays in zstd until it is stored again.
            atomic_add(&self.recompressed_loads, 1)
            return 0 if self._unzstd(r, out) else 1
        if r.length == ps:
            memcpy(out, self._slot_ptr(r), ps)
            return 0
        return 0 if LZ4_decompress_safe(self._slot_ptr(r), out, r.length, ps) == ps else 1

    def payload(self, long handle) -> bytes:
        """A kept page in the codec's format, for Redis and the writeback tiers."""
        cdef Record* r
        cdef uint64_t word
        cdef int32_t length
        cdef uint64_t hash
        cdef int ps = self.page_size
        self._check(handle)
        r = &self.records[handle]
        if r.length == 0:
            word = record_word(r)
            return PyBytes_FromStringAndSize(<char*>&word, WORD)
        if r.live_flags & CODEC_MASK != CODEC_NATIVE:
            # The codec's format has no zstd: give the payload it replaced, made again
            # (the same bytes, and hash, when the same liblz4 made both).
            if self._load_one(<uint32_t>handle, self.scratch):
                raise ValueError("corrupt payload")
            encode_page(self.scratch, ps, self.reject_limit, self.scratch + ps,
                        LZ4_compressBound(ps), &length, &hash)
            return PyBytes_FromStringAndSize(self.scratch + ps, length)
        return PyBytes_FromStringAndSize(self._slot_ptr(r), r.length)

    # -- recompression: a sweep over the records ------------------------------------------

    def recompress_begin(self, int max_pages, int level, long scan_limit=65536,
                         bint dictionary=False, int train=0,
                         double min_saving=DICT_MIN_SAVING) -> RecompressBatch:
        """The next up to `max_pages` idle lz4 or raw payloads of the sweep, copied out.

        With `dictionary` the batch uses the current dictionary, if there is one; with
        `train` (bytes) the batch is instead up to `max_pages` idle pages spread evenly
        over the store (the sweep's place unchanged) and its `run` trains a new
        dictionary of at most that size from them first, which the commit makes current
        if it saved `min_saving` of plain zstd's slots on the pages held out of its
        sample.

        The sweep visits at most `scan_limit` records per call. A visited record that is
        not idle is marked idle; one that still is (neither loaded nor stored since the
        last visit) is taken. So a page is taken one to two sweeps after its last use.
        """
        cdef int ps = self.page_size
        cdef RecompressBatch batch = RecompressBatch.__new__(RecompressBatch)
        if max_pages < 1 or not 1 <= level <= ZSTD_maxCLevel():
            raise ValueError("max_pages must be positive and the level a zstd level")
        batch.page_size = ps
        batch.level = level
        batch.out_bound = <int>ZSTD_compressBound(ps)
        batch.recs = <uint32_t*>malloc(max_pages * sizeof(uint32_t))
        batch.lengths = <int32_t*>malloc(max_pages * sizeof(int32_t))
        batch.out_lengths = <int32_t*>calloc(max_pages, sizeof(int32_t))
        batch.out_dict = <uint8_t*>calloc(max_pages, 1)
        batch.dict_slot = -1
        if train > 0:
            batch.train_capacity = train
            batch.min_saving = min_saving
        elif dictionary and self.current_dict >= 0:
            batch.dictionary = self.dictionaries[self.current_dict]
            batch.dict_slot = self.current_dict
        if self.dict_dead:
            self._reap_dictionaries()
        cdef size_t need = max_pages * (2 * <size_t>ps + <size_t>batch.out_bound)
        if self.recompress_spare != NULL and self.recompress_spare_bytes >= need:
            batch.workspace, batch.workspace_bytes = self.recompress_spare, self.recompress_spare_bytes
            self.recompress_spare, self.recompress_spare_bytes = NULL, 0
        else:
            batch.workspace, batch.workspace_bytes = <char*>malloc(need), need
        if (batch.recs == NULL or batch.lengths == NULL or batch.out_lengths == NULL
                or batch.out_dict == NULL or batch.workspace == NULL):
            raise MemoryError()
        batch.src = batch.workspace
        batch.pages = batch.src + max_pages * <size_t>ps
        batch.out = batch.pages + max_pages * <size_t>ps
        cdef long visited = 0
        cdef int n = 0
        cdef Record* r
        cdef uint32_t rec
        cdef long eligible = 0, seen = 0
        if train > 0:
            # The training sample is spread over the whole store, every k-th idle page,
            # not the sweep's next ones (the first pages of a process's memory or of a
            # sorted walk of files are unlike the rest); the sweep itself is left as it
            # is. On the bench's anon corpus the next 1024 pages trained a dictionary
            # that did not pay; spread ones, one that saves 3.3% on the held-out pages.
            with nogil:
                for rec in range(self.nrecords):
                    r = &self.records[rec]
                    if self._sweepable(r) and r.live_flags & IDLE:
                        eligible += 1
                for rec in range(self.nrecords):
                    if n >= max_pages:
                        break
                    r = &self.records[rec]
                    if self._sweepable(r) and r.live_flags & IDLE:
                        # Taken where the count crosses the next mark: evenly spaced.
                        if (seen * max_pages) // max(eligible, 1) >= n:
                            batch.recs[n] = rec
                            batch.lengths[n] = r.length
                            memcpy(batch.src + <size_t>n * ps, self._slot_ptr(r), r.length)
                            n += 1
                        seen += 1
            batch.count = n
            return batch
        with nogil:
            while visited < scan_limit and n < max_pages:
                if self.sweep_cursor >= self.nrecords:
                    self.sweep_cursor = 0
                    batch.sweep_done = True
                    break
                r = &self.records[self.sweep_cursor]
                if self._sweepable(r):
                    if r.live_flags & IDLE:
                        batch.recs[n] = self.sweep_cursor
                        batch.lengths[n] = r.length
                        memcpy(batch.src + <size_t>n * ps, self._slot_ptr(r), r.length)
                        n += 1
                    else:
                        r.live_flags |= IDLE
                self.sweep_cursor += 1
                visited += 1
        batch.count = n
        return batch

    cdef inline bint _sweepable(self, Record* r) noexcept nogil:
        """A live lz4 or raw payload that zstd was not found useless for."""
        return (r.refs and r.length and r.live_flags & CODEC_MASK == CODEC_NATIVE
                and not r.live_flags & TRIED)

    def recompress_commit(self, RecompressBatch batch) -> int:
        """Swap in the zstd payloads of a batch that ran; the pages recompressed.

        A record is changed only if it still holds the very payload that was copied and
        was not loaded or stored since: anything that happened meanwhile wins.
        """
        cdef int ps = self.page_size
        cdef int i
        cdef long pages = 0
        cdef uint32_t rec
        cdef int32_t zlen
        cdef Record* r
        cdef Record old
        cdef int k = -1
        cdef uint8_t codec
        if batch.count and not batch.ran:
            raise ValueError("the batch has not run")
        if batch.committed:
            raise ValueError("the batch was committed already")
        batch.committed = True
        if batch.dictionary is not None:
            if batch.dict_slot < 0:
                k = self._install_dictionary(batch.dictionary)
            elif (batch.dict_slot == self.current_dict
                    and self.dictionaries[batch.dict_slot] is batch.dictionary):
                k = batch.dict_slot
            if k < 0:
                # Its dictionary was replaced meanwhile (or no slot is free): the pages
                # stay as they are, idle, for the next sweep.
                return 0
        with nogil:
            for i in range(batch.count):
                rec = batch.recs[i]
                if rec >= self.nrecords:
                    continue
                r = &self.records[rec]
                if (not r.refs or r.live_flags & CODEC_MASK != CODEC_NATIVE
                        or not r.live_flags & IDLE or r.length != batch.lengths[i]
                        or memcmp(self._slot_ptr(r), batch.src + <size_t>i * ps, r.length)):
                    continue
                zlen = batch.out_lengths[i]
                if zlen == 0:
                    r.live_flags |= TRIED
                    continue
                old = r[0]
                if not self._alloc_slot(rec, zlen):
                    continue            # no memory for a smaller slot: it stays as it is
                # The new length before the slot is reached: the class follows from it.
                r.length = <uint16_t>zlen
                memcpy(self._slot_ptr(r), batch.out + <size_t>i * batch.out_bound, zlen)
                self._free_slot(&old)
                r.native_length = old.length
                codec = CODEC_DICT + k if batch.out_dict[i] else CODEC_ZSTD
                r.live_flags = codec | IDLE
                self.payload_bytes -= old.length - zlen
                self.zstd_payload_bytes += zlen
                self.recompress_saved_bytes += old.length - zlen
                self.recompressed_pages += r.refs
                if codec >= CODEC_DICT:
                    self.dict_records[k] += 1
                    self.dict_pages += r.refs
                    self.dict_payload_bytes += zlen
                pages += r.refs
        self._keep_workspace(batch)
        return pages

    cdef void _keep_workspace(self, RecompressBatch batch) noexcept:
        """Take a committed batch's workspace for the next batch of its sweep; the
        sweep's last batch (or a training batch, four times the size) gives it back."""
        if batch.sweep_done or batch.train_capacity or self.recompress_spare != NULL:
            return  # the batch frees it
        self.recompress_spare, self.recompress_spare_bytes = batch.workspace, batch.workspace_bytes
        batch.workspace = batch.src = batch.pages = batch.out = NULL
        batch.workspace_bytes = 0

    # -- inspection ----------------------------------------------------------------------

    def codec(self, long handle) -> str:
        """How a page is held: "same" (its word), "raw", "lz4", "zstd" or "zstd+dict"."""
        cdef Record* r
        self._check(handle)
        r = &self.records[handle]
        if r.length == 0:
            return "same"
        if r.live_flags & CODEC_MASK >= CODEC_DICT:
            return "zstd+dict"
        if r.live_flags & CODEC_MASK != CODEC_NATIVE:
            return "zstd"
        return "raw" if r.length == self.page_size else "lz4"

    def dictionary_of(self, long handle) -> int:
        """The dictionary slot a page's zstd payload was made with; -1 for none."""
        self._check(handle)
        return max((self.records[handle].live_flags & CODEC_MASK) - CODEC_DICT, -1)

    def length(self, long handle) -> int:
        """Payload bytes behind a handle (0 for a same-filled page)."""
        self._check(handle)
        return self.records[handle].length

    def refs(self, long handle) -> int:
        self._check(handle)
        return self.records[handle].refs

    def is_same_filled(self, long handle) -> bool:
        self._check(handle)
        return self.records[handle].length == 0

    def class_geometry(self, int length) -> tuple:
        """(slot bytes, chunk bytes, slots per chunk, chunks at most) of the size class
        that keeps payloads of `length` bytes."""
        if not 0 < length <= self.page_size:
            raise ValueError(f"no size class for {length} bytes")
        cdef SizeClass* sc = &self.classes[class_of(length)]
        return sc.size, sc.chunk_bytes, sc.per_chunk, sc.max_chunks

    def chunks_held(self) -> dict:
        """Chunks that hold memory, by slot size: what compaction leaves, for tests."""
        cdef int c
        cdef uint32_t k, held
        out = {}
        for c in range(self.nclasses):
            held = 0
            for k in range(self.classes[c].nchunks):
                held += self.classes[c].chunks[k].base != NULL
            if held:
                out[self.classes[c].size] = held
        return out

    def _limit_refs(self, int refs) -> None:
        """Tests: hold at most `refs` references per record (MAX_REFS at most), so that
        what happens past a full count is reached with a few pages."""
        self.refs_cap = max(1, min(refs, MAX_REFS))

    def _limit_chunks(self, int chunks) -> None:
        """Tests: at most `chunks` chunks per class, as if their numbers ran out."""
        cdef int c
        for c in range(self.nclasses):
            self.classes[c].max_chunks = min(self.classes[c].max_chunks, <uint32_t>max(chunks, 0))

    def summarize(self, handles) -> tuple:
        """(same-filled pages, shared pages, payload bytes charged to them, pages held in
        zstd) over handles: a shared payload is split among its references, as
        payload_share splits it. `handles` is a sequence of ints, or bytes of native
        int64s (PageTable.handle_bytes: no Python int per page)."""
        cdef long same = 0, shared = 0, zstd = 0
        cdef double charged = 0
        cdef long h
        cdef Py_ssize_t i, n
        cdef const int64_t* packed
        cdef Record* r
        if isinstance(handles, bytes):
            n = len(<bytes>handles) // sizeof(int64_t)
            packed = <const int64_t*>PyBytes_AS_STRING(handles)
        else:
            handles = list(handles)
            n = len(handles)
            packed = NULL
        for i in range(n):
            if packed != NULL:
                h = packed[i]
            else:
                h = handles[i]
            self._check(h)
            r = &self.records[h]
            if r.length == 0:
                same += 1
                continue
            if r.refs > 1:
                shared += 1
            if r.live_flags & CODEC_MASK != CODEC_NATIVE:
                zstd += 1
            charged += <double>r.length / r.refs
        return same, shared, charged, zstd

    def memory_used(self) -> int:
        """What the store holds for pages: slots in use, records, the dedup table. The
        records of same-filled words are not counted: there are a few, shared by all.
        The zstd dictionaries count, with their tables."""
        if self.dict_dead:
            self._reap_dictionaries()
        return (self.slot_bytes + (self.live_records - self.word_records) * RECORD_OVERHEAD
                + self.dictionary_bytes)

    def memory_mapped(self) -> int:
        """Memory really taken: chunks in use and every table, at their capacity."""
        cdef long tables = (<long>self.cap_records * sizeof(Record)
                            + (<long>self.table_mask + 1) * 4)
        cdef int c
        for c in range(self.nclasses):
            tables += self.classes[c].cap_chunks * sizeof(Chunk)
            tables += self.classes[c].cap_partial * 4
        return self.chunk_bytes + tables + self.dictionary_bytes

    def cost_of(self, int length) -> int:
        """What keeping a new payload of `length` bytes adds to memory_used."""
        if length == 0:
            return 0
        return ((length + GRAIN - 1) // GRAIN) * GRAIN + RECORD_OVERHEAD

    def batch_cost(self, EncodedBatch batch not None) -> int:
        """What keeping every page of a batch adds at most (no dedup assumed): the sum
        of cost_of over its pages, in one call (the image path's budget check)."""
        cdef long total = 0
        cdef long record = RECORD_OVERHEAD
        cdef int i, length
        for i in range(batch.count):
            length = batch.lengths[i]
            if length:
                total += slot_size(length) + record
        return total

    def charge_of(self, handles) -> int:
        """The sum of cost_of(length) over handles: what a pool's limits charged them."""
        cdef long total = 0
        cdef long record = RECORD_OVERHEAD
        cdef long h
        cdef int length
        for h in handles:
            self._check(h)
            length = self.records[h].length
            if length:
                total += slot_size(length) + record
        return total

    # -- housekeeping --------------------------------------------------------------------

    def compact(self, long min_gain=0) -> int:
        """Move payloads out of the sparsest chunks of each class into fuller ones, so at
        most about one chunk per class is partly empty; returns the bytes given back.

        The moves are one pass over every record, so they are made only if the chunks
        they would empty hold at least `min_gain` bytes: the periodic compaction passes
        a share of the chunk memory, so that its cost follows what it gives back."""
        cdef long before = self.chunk_bytes
        cdef long gain = 0
        cdef int c
        with nogil:
            for c in range(self.nclasses):
                if self._plan_class(&self.classes[c]):
                    gain += self._source_bytes(&self.classes[c])
            # No slot knows its record: one pass over the records finds those to move,
            # and only when some class has a chunk to empty.
            if gain and gain >= min_gain:
                self._move_sources()
            for c in range(self.nclasses):
                self._relist_class(&self.classes[c])
        self._trim_tables()
        if self.live_records == 0:
            # After a flush: give back what malloc keeps of the freed tables and of
            # the daemon's other freed memory (batches' scratch buffers, the index).
            with nogil:
                malloc_trim(0)
        return before - self.chunk_bytes

    cdef bint _plan_class(self, SizeClass* sc) noexcept nogil:
        """Sort a class's live partial chunks, fullest last, and mark as sources the
        sparsest ones whose slots all fit in the others' room; whether there is one."""
        cdef uint32_t i, chunk, n = 0
        cdef long moved = 0, room = 0
        sc.nsources = 0
        sc.sources = NULL
        for i in range(sc.nchunks):
            if sc.chunks[i].base != NULL:
                break
        else:
            # Nothing kept in the class (a flush): its tables and arenas go too.
            self._release_class(sc)
            return False
        # Live partial chunks only: the memoryless ones are listed again afterwards.
        for i in range(sc.npartial):
            if sc.chunks[sc.partial[i]].base != NULL:
                sc.partial[n] = sc.partial[i]
                n += 1
            else:
                sc.chunks[sc.partial[i]].partial = 0
        sc.npartial = n
        if n < 2:
            return False
        # Sort by use, fullest last. A counting sort: after random releases over 10^6
        # pages a class lists thousands of partial chunks, and an insertion sort of
        # them is quadratic.
        if not self._sort_by_use(sc, n):
            return False        # no memory for the sort: this class waits for the next
        for i in range(n):
            room += sc.per_chunk - sc.chunks[sc.partial[i]].used
        # Take sources from the sparsest while what they hold fits in the rest's room:
        # the room left over is then less than one chunk's slots.
        for i in range(n - 1):
            moved += sc.chunks[sc.partial[i]].used
            room -= sc.per_chunk - sc.chunks[sc.partial[i]].used
            if moved > room:
                break
            sc.nsources = i + 1
        if sc.nsources == 0:
            return False
        sc.sources = <uint64_t*>calloc((sc.nchunks + 63) // 64, sizeof(uint64_t))
        if sc.sources == NULL:
            sc.nsources = 0     # no memory for the bitmap: this class waits for the next
            return False
        for i in range(sc.nsources):
            chunk = sc.partial[i]
            sc.sources[chunk >> 6] |= 1ULL << (chunk & 63)
        sc.fill = n - 1
        return True

    cdef long _source_bytes(self, SizeClass* sc) noexcept nogil:
        """The memory a class's planned sources hold (what moving them gives back)."""
        cdef long total = 0
        cdef uint32_t i
        for i in range(sc.nsources):
            total += self._populated(sc, &sc.chunks[sc.partial[i]])
        return total

    cdef bint _sort_by_use(self, SizeClass* sc, uint32_t n) noexcept nogil:
        """Sort partial[:n] by their chunks' use, fewest slots used first (stable)."""
        cdef uint32_t* counts = <uint32_t*>calloc(sc.per_chunk + 1, sizeof(uint32_t))
        cdef uint32_t* order = <uint32_t*>malloc(max(n, 1) * sizeof(uint32_t))
        cdef uint32_t i, used, at = 0, count
        if counts == NULL or order == NULL:
            free(counts)
            free(order)
            return False
        for i in range(n):
            counts[sc.chunks[sc.partial[i]].used] += 1
        for used in range(sc.per_chunk + 1):
            count = counts[used]
            counts[used] = at
            at += count
        for i in range(n):
            used = sc.chunks[sc.partial[i]].used
            order[counts[used]] = sc.partial[i]
            counts[used] += 1
        memcpy(sc.partial, order, n * sizeof(uint32_t))
        free(counts)
        free(order)
        return True

    cdef void _move_sources(self) noexcept nogil:
        """Move every payload kept in a source chunk into its class's destinations,
        fullest first; each source ends empty and gives its memory back."""
        cdef uint32_t rec, chunk, slot, nslot, dst
        cdef Record* r
        cdef SizeClass* sc
        cdef Chunk* s
        cdef Chunk* d
        for rec in range(self.nrecords):
            r = &self.records[rec]
            # Free records (their loc links the free list) and same-filled words (no slot).
            if r.refs == 0 or r.length == 0:
                continue
            sc = &self.classes[class_of(r.length)]
            if sc.nsources == 0:
                continue
            chunk = r.loc >> sc.slot_bits
            if not (sc.sources[chunk >> 6] >> (chunk & 63)) & 1:
                continue
            s = &sc.chunks[chunk]
            slot = r.loc & ((1u << sc.slot_bits) - 1)
            dst = sc.partial[sc.fill]
            d = &sc.chunks[dst]
            while d.used == sc.per_chunk:
                # The plan left room enough in the destinations: fill never passes them.
                sc.fill -= 1
                dst = sc.partial[sc.fill]
                d = &sc.chunks[dst]
            nslot = self._take_slot(sc, d)
            memcpy(d.base + <size_t>nslot * sc.size, s.base + <size_t>slot * sc.size, sc.size)
            d.used += 1
            r.loc = dst << sc.slot_bits | nslot
            s.used -= 1
            if s.used == 0:
                self._empty_chunk(sc, s)

    cdef void _relist_class(self, SizeClass* sc) noexcept nogil:
        """After the moves: the partial list is the chunks with room, fullest on top (used
        first), then the memoryless ones beneath."""
        cdef uint32_t i, n = 0
        for i in range(sc.npartial):
            if sc.chunks[sc.partial[i]].used < sc.per_chunk:
                sc.partial[n] = sc.partial[i]
                n += 1
            else:
                sc.chunks[sc.partial[i]].partial = 0
        sc.npartial = n
        sc.nsources = 0
        free(sc.sources)
        sc.sources = NULL
        self._relist_empty(sc)

    cdef void _release_class(self, SizeClass* sc) noexcept nogil:
        cdef uint32_t a
        for a in range(sc.narenas):
            munmap(sc.arenas[a], ARENA_BYTES)
        self.arena_count -= sc.narenas
        free(sc.arenas)
        free(sc.chunks)
        free(sc.partial)
        sc.arenas, sc.chunks, sc.partial = NULL, NULL, NULL
        sc.narenas = sc.nchunks = sc.cap_chunks = sc.npartial = sc.cap_partial = 0

    cdef void _relist_empty(self, SizeClass* sc) noexcept nogil:
        cdef uint32_t k
        for k in range(sc.nchunks):
            if not sc.chunks[k].partial and sc.chunks[k].used < sc.per_chunk:
                # Memoryless chunks go to the bottom: live ones are filled first.
                if self._push_partial(sc, k):
                    sc.partial[sc.npartial - 1] = sc.partial[0]
                    sc.partial[0] = k

    cdef void _trim_tables(self):
        """Give back record and dedup table memory that a mass invalidate left unused."""
        # The spare batch scratches too: the next large batch maps one again.
        free(self.spare)
        self.spare, self.spare_bytes = NULL, 0
        free(self.recompress_spare)
        self.recompress_spare, self.recompress_spare_bytes = NULL, 0
        cdef uint32_t top = self.nrecords
        cdef uint32_t rec, cap, size
        cdef Record* shrunk
        while top > 0 and self.records[top - 1].refs == 0:
            top -= 1
        if top + top // 2 + 1024 < self.cap_records:
            self.free_record = NO_RECORD
            for rec in range(top):
                if self.records[rec].refs == 0:
                    self.records[rec].loc = self.free_record
                    self.free_record = rec
            self.nrecords = top
            cap = max(1024, top)
            shrunk = <Record*>realloc(self.records, cap * sizeof(Record))
            if shrunk != NULL:
                self.records, self.cap_records = shrunk, cap
        size = 1024
        while size < self.table_used * 4:
            size *= 2
        if size < (self.table_mask + 1) // 2:
            self._resize_table(size)

    cdef bint _resize_table(self, uint32_t size) noexcept nogil:
        """Rehash the dedup table to `size` slots; False (table unchanged) without memory."""
        cdef uint32_t* table = <uint32_t*>calloc(size, sizeof(uint32_t))
        cdef uint32_t* old = self.table
        cdef uint32_t old_size = self.table_mask + 1 if old != NULL else 0
        cdef uint32_t i, pos
        if table == NULL:
            return False
        self.table = table
        self.table_mask = size - 1
        for i in range(old_size):
            if old[i]:
                pos = <uint32_t>self.records[old[i] - 1].hash & self.table_mask
                while table[pos]:
                    pos = (pos + 1) & self.table_mask
                table[pos] = old[i]
        free(old)
        return True
