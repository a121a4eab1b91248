// `npm run bench` (boot section; run on the host as root): how long a diskless machine takes from
// the kernel's start to its init running from the NBD root (the guest's uptime when /sbin/init
// starts), with nbd-attach's initramfs-tools hook versus nbd-client's own (Debian's nbd-client
// package), both initramfs images built by mkinitramfs in the same run and booted alternately with
// the same image, server (nbdkit) and command line (nbd-client's form, which both understand).
// Target: ours ≤ 1.5 × nbd-client's. BENCH_BOOT_REPS (default 1) boots each that often.

import { rmSync } from 'node:fs';
import path from 'node:path';
import { startNbdkit, stopAllServers, tmpDir } from '../lib/servers.ts';
import { GUEST_IP, GUEST_SERVER, boot, buildInitramfsTools, buildRootImage, setup, stageLib } from './lib.ts';

const reps = Math.max(1, Number(process.env['BENCH_BOOT_REPS'] ?? 1));
const work = tmpDir('nbd-boot-bench-');
const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

try {
  setup();
  const lib = stageLib(path.join(work, 'lib'));
  const ours = path.join(work, 'initrd.nbd-attach');
  const theirs = path.join(work, 'initrd.nbd-client');
  buildInitramfsTools(ours, { withNbdAttach: true, lib });
  buildInitramfsTools(theirs, { withNbdAttach: false });
  const image = buildRootImage(work);
  const server = await startNbdkit(['file', image.file]);
  const times: Record<string, number[]> = { 'nbd-attach': [], 'nbd-client': [] };
  for (let i = 0; i < reps; i++) {
    for (const [name, initrd] of [['nbd-attach', ours], ['nbd-client', theirs]] as const) {
      const r = await boot({ initrd, append: `${GUEST_IP} nbdroot=${GUEST_SERVER},rootfs,nbd0 root=/dev/nbd0 rw`, serverPort: server.port, timeoutMs: 420_000 });
      const up = Number(r.values.get('uptime'));
      if (r.timedOut || !r.lines.includes('done') || !Number.isFinite(up)) {
        throw new Error(`${name}: the boot did not reach the root's init:\n${r.console.split('\n').slice(-40).join('\n')}`);
      }
      times[name]!.push(up);
      process.stdout.write(`boot ${name} #${i + 1}: init running ${up.toFixed(1)} s after the kernel started\n`);
    }
  }
  const a = median(times['nbd-attach']!);
  const c = median(times['nbd-client']!);
  const ratio = a / c;
  process.stdout.write(`boot: kernel start → init on the NBD root: nbd-attach ${a.toFixed(1)} s, nbd-client ${c.toFixed(1)} s: ${ratio.toFixed(2)}× (target ≤ 1.5×: ${ratio <= 1.5 ? 'met' : 'MISSED'})\n`);
} finally {
  await stopAllServers();
  rmSync(work, { recursive: true, force: true });
}
