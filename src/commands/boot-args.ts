// `nbd-attach boot-args [--cmdline TEXT] [--root-path TEXT] [--root-server HOST] [--tls-dir-present]`:
// what the initramfs scripts (packaging/initramfs-tools, packaging/dracut) ask before they attach the
// root: the kernel command line's NBD root, as shell assignments (src/boot/cmdline.ts). Prints
// nothing when the command line asks for no NBD root; a form it cannot use is a one-line error.

import fs from 'node:fs';
import type { Command } from 'commander';
import { planAsShell, planBoot } from '../boot/cmdline.ts';
import { writeOut } from '../output.ts';

export function register(program: Command): void {
  program
    .command('boot-args')
    .description('print, as shell assignments, how the kernel command line asks to attach an NBD root (for initramfs scripts)')
    .option('--cmdline <text>', 'the kernel command line (default: /proc/cmdline)')
    .option('--root-path <text>', "DHCP's root-path (option 17), for nbdroot=dhcp / netroot=dhcp")
    .option('--root-server <host>', "DHCP's server, for an nbdroot= without a host")
    .option('--tls-dir-present', 'the initramfs carries TLS material in /etc/nbd-attach/initramfs-tls (used by nbds:// URIs that name none)')
    .action((opts: { cmdline?: string; rootPath?: string; rootServer?: string; tlsDirPresent?: boolean }) => {
      const cmdline = opts.cmdline ?? fs.readFileSync('/proc/cmdline', 'utf8');
      const plan = planBoot(cmdline, {
        dhcp: { rootPath: opts.rootPath || undefined, rootServer: opts.rootServer || undefined },
        tlsDirPresent: opts.tlsDirPresent === true,
      });
      if (plan) writeOut(planAsShell(plan));
    });
}
