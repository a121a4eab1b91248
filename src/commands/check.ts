// `nbd-attach check DEV` (also `-c DEV`): nbd-client semantics — exit 0 and print the pid when
// attached, exit 1 when not.

import type { Command } from 'commander';
import { ExitCode } from '../errors.ts';
import { writeErr, writeOut } from '../output.ts';

export function register(program: Command): void {
  program
    .command('check')
    .description('is /dev/nbdN attached? prints the pid and exits 0, else exits 1 (nbd-client -c)')
    .argument('<device>', '/dev/nbdN, nbdN or any block node of major 43')
    .action(async (device: string) => {
      const { check } = await import('../kernel/check.ts');
      const r = check(device);
      if (r.pid !== undefined) {
        writeOut(`${r.pid}\n`);
        process.exitCode = ExitCode.OK;
      } else {
        writeErr(`nbd-attach: ${r.device} is not attached\n`);
        process.exitCode = ExitCode.FAILURE;
      }
    });
}
