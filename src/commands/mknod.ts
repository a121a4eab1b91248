// `nbd-attach mknod [--count N] [--prefix nd|nbd] [--dir /dev]`: create nbd block nodes for machines
// without udev, with the minors the loaded module's max_part implies. Idempotent.

import { InvalidArgumentError, Option, type Command } from 'commander';
import { writeOut } from '../output.ts';

export function register(program: Command): void {
  program
    .command('mknod')
    .description('create /dev/nbdN block nodes (major 43) for machines without udev')
    .addOption(
      new Option('--count <n>', 'how many devices (default: the module\'s nbds_max)').argParser((t) => {
        if (!/^\d+$/.test(t) || Number(t) < 1 || Number(t) > 1 << 20) throw new InvalidArgumentError(`'${t}' is not a device count`);
        return Number(t);
      }),
    )
    .addOption(new Option('--prefix <prefix>', 'node name prefix').choices(['nbd', 'nd']).default('nbd'))
    .option('--dir <dir>', 'directory for the nodes', '/dev')
    .action(async (opts: { count?: number; prefix: 'nbd' | 'nd'; dir: string }) => {
      const { mknodAll } = await import('../kernel/mknod.ts');
      const r = mknodAll({ ...(opts.count !== undefined ? { count: opts.count } : {}), prefix: opts.prefix, dir: opts.dir });
      writeOut(`created ${r.created.length} node(s), ${r.existing.length} already present (max_part=${r.maxPart})\n`);
    });
}
