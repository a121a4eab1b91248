// `nbd-attach detach DEV…` (also `-d DEV`): disconnect devices. Netlink DISCONNECT; ioctl
// DISCONNECT + CLEAR_SOCK with -L or when the kernel has no netlink family.

import type { Command } from 'commander';
import { detach } from '../kernel/attach.ts';

export function register(program: Command): void {
  program
    .command('detach')
    .alias('disconnect')
    .description('disconnect /dev/nbdN (nbd-client -d); a device that is not attached is left as it is')
    .argument('<device...>', '/dev/nbdN, nbdN or any block node of major 43')
    .option('-L, --ioctl', 'use the ioctl interface instead of netlink')
    .option('--force', 'disconnect even when mounted (the filesystem then gets I/O errors)')
    .action(async (devices: string[], opts: { ioctl?: boolean; force?: boolean }) => {
      for (const device of devices) {
        const r = await detach({
          device,
          force: opts.force === true,
          useIoctl: opts.ioctl === true,
          notice: (m) => process.stderr.write(`nbd-attach: note: ${m}\n`),
        });
        if (r.wasAttached) process.stdout.write(`${r.device} detached\n`);
        else process.stderr.write(`nbd-attach: ${r.device} was not attached\n`);
      }
    });
}
