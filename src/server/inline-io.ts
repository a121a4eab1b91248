// When file I/O may run on the event loop instead of the libuv thread pool.
//
// A page-cache hit takes a few microseconds as a direct call; the same call sent to the pool costs a
// queue hand-off, a thread wake-up and a callback (measured on the host, 4k random reads at QD16:
// 18k IOPS through the pool, 46k inline; docs/decisions.md "Inline file I/O"). But a
// call that waits would stall every connection of the process, and the supervisor of a local attach
// with them (no reconnect, no signal handling). So only calls that cannot wait run inline: reads with
// preadv2(RWF_NOWAIT), which returns EAGAIN instead of waiting, and any call on a file in RAM
// (tmpfs, ramfs: nothing there waits for a disk, and they cannot be frozen) or in memory. Plain
// reads and writes of a disk image always go to the pool (docs/decisions.md "Writes never block
// the event loop").

/**
 * Largest WRITE run inline. Bigger ones go to the pool: copying 1 MiB there runs on another CPU
 * while the event loop receives the next payload. READs of any size run inline when they can: there
 * the pool round trip costs the loop more than the copy. Measured in the test VM, 1 MiB QD4, pool
 * vs inline, two runs each: writes 43/36 vs 26/32 IOPS, reads 35/19 vs 55/50 IOPS.
 */
export const INLINE_WRITE_MAX_BYTES = 64 * 1024;
