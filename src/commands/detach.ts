// `nbd-attach detach DEV…` (also `-d DEV`): disconnect devices. Netlink DISCONNECT; ioctl
// DISCONNECT + CLEAR_SOCK with -L or when the kernel has no netlink family.

import type { Command } from 'commander';
import { clearDetachRequested, markDetachRequested, pidAlive, readState } from '../supervisor/state.ts';
import { writeErr, writeOut } from '../output.ts';

/** How long `detach` waits for the device's supervisor to finish (flush a local image, exit). */
const SUPERVISOR_EXIT_WAIT_MS = 15_000;

/**
 * After the kernel let go, wait (bounded) for the supervisor of the device to exit, so that when
 * `nbd-attach -d` returns a local image (`--file`) is flushed and closed and nothing is left running.
 * Returns false when it is still running at the deadline.
 */
async function waitForSupervisor(index: number, device: string): Promise<boolean> {
  const s = readState(index);
  if (!s || s.pid === process.pid || !pidAlive(s.pid)) return true;
  const deadline = Date.now() + SUPERVISOR_EXIT_WAIT_MS;
  while (pidAlive(s.pid)) {
    if (Date.now() >= deadline) {
      writeErr(`nbd-attach: note: ${device} is detached, but its supervisor (pid ${s.pid}) has not exited yet; see ${s.logFile ?? 'its log'}\n`);
      return false;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return true;
}

export function register(program: Command): void {
  program
    .command('detach')
    .alias('disconnect')
    .description('disconnect /dev/nbdN (nbd-client -d); a device that is not attached is left as it is')
    .argument('<device...>', '/dev/nbdN, nbdN or any block node of major 43')
    .option('-L, --ioctl', 'use the ioctl interface instead of netlink')
    .option('--force', 'disconnect even when mounted (the filesystem then gets I/O errors)')
    .action(async (devices: string[], opts: { ioctl?: boolean; force?: boolean }) => {
      const { detach } = await import('../kernel/attach.ts');
      for (const device of devices) {
        const r = await detach({
          device,
          force: opts.force === true,
          useIoctl: opts.ioctl === true,
          beforeDisconnect: markDetachRequested,
          notice: (m) => writeErr(`nbd-attach: note: ${m}\n`),
        });
        if (r.wasAttached) {
          // The detach marker is for an ioctl-mode supervisor, which takes it as it exits; once no
          // supervisor runs it has no reader left, so it goes (a netlink supervisor never reads it).
          if (await waitForSupervisor(r.index, r.device)) clearDetachRequested(r.index);
          writeOut(`${r.device} detached\n`);
        }
        else writeErr(`nbd-attach: ${r.device} was not attached\n`);
      }
    });
}
