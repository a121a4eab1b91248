// `nbd-attach list HOST [PORT]` (also `-l HOST`): the exports a server offers, with details.

import type { Command } from 'commander';
import { describeEndpoint } from '../address.ts';
import { type ServerOptions, addServerOptions, exportJson, formatFlags, formatSize, resolveTarget } from './common.ts';
import { display, jsonString, jsonText, oneLine } from '../text.ts';
import { writeErr, writeOut } from '../output.ts';

export function register(program: Command): void {
  addServerOptions(program.command('list').alias('ls'), { name: false })
    .description('list the exports of a server, with size, flags and block sizes (nbd-client -l)')
    .argument('[host]', 'HOST, HOST:PORT, [IPv6]:PORT or nbd:// URI')
    .argument('[port]', 'port, when given separately (default 10809)')
    .option('--json', 'print JSON for scripts')
    .option('--no-details', 'names only: do not ask NBD_OPT_INFO for each export')
    .action(async (host: string | undefined, port: string | undefined, opts: ServerOptions & { json?: boolean; details: boolean }) => {
      const { target } = resolveTarget(host, port, opts);
      const { listExports } = await import('../client/negotiate.ts');
      const r = await listExports(target, { timeoutMs: opts.connectTimeout, details: opts.details });
      const exports = r.exports ?? [];
      if (opts.json) {
        const out = {
          server: describeEndpoint(target.endpoint),
          handshake: r.style,
          tls: target.tls !== false,
          ...(r.note ? { note: r.note } : {}),
          exports: exports.map((e) => ({
            ...(e.info ? exportJson(e.info) : {}),
            // NBD_INFO_DESCRIPTION when the server sent one, else NBD_REP_SERVER's.
            ...jsonString('name', e.name),
            ...jsonString('description', e.info?.description ?? e.description),
            ...(e.infoError ? { error: e.infoError } : {}),
          })),
        };
        writeOut(`${jsonText(out)}\n`);
        return;
      }
      if (r.note) writeErr(`nbd-attach: note: ${r.note}\n`);
      if (exports.length === 0) {
        writeOut(`${describeEndpoint(target.endpoint)} lists no exports\n`);
        return;
      }
      // One line per export, whatever the server put in its names and descriptions (src/text.ts).
      for (const e of exports) {
        const name = e.name === '' ? '(default)' : display(e.name);
        const parts = [name];
        if (e.info) {
          parts.push(formatSize(e.info.size), formatFlags(e.info.flags));
          if (e.info.blockSize) parts.push(`block ${e.info.blockSize.min}/${e.info.blockSize.preferred}/${e.info.blockSize.max}`);
        }
        if (e.infoError) parts.push(`(${oneLine(e.infoError)})`);
        const description = e.description || e.info?.description;
        if (description) parts.push(`- ${display(description)}`);
        writeOut(`${parts.join('\t')}\n`);
      }
    });
}
