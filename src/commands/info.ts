// `nbd-attach info URI|HOST [PORT] [-N EXPORT]`: one export's size, flags and block sizes.

import type { Command } from 'commander';
import { describeEndpoint } from '../address.ts';
import { type ServerOptions, addServerOptions, exportJson, formatFlags, formatSize, resolveTarget } from './common.ts';
import { display, jsonText } from '../text.ts';
import { writeErr, writeOut } from '../output.ts';

export function register(program: Command): void {
  addServerOptions(program.command('info'))
    .description('show one export: size, flags, block sizes, description')
    .argument('[host]', 'HOST, HOST:PORT, [IPv6]:PORT or nbd:// URI (its path names the export)')
    .argument('[port]', 'port, when given separately (default 10809)')
    .option('--json', 'print JSON for scripts')
    .action(async (host: string | undefined, port: string | undefined, opts: ServerOptions & { json?: boolean }) => {
      const { target, exportName } = resolveTarget(host, port, opts);
      const { exportInfo } = await import('../client/negotiate.ts');
      const r = await exportInfo(target, exportName, { timeoutMs: opts.connectTimeout });
      const info = r.info!;
      if (opts.json) {
        const out = { server: describeEndpoint(target.endpoint), handshake: r.style, via: r.via, tls: target.tls !== false, ...(r.note ? { note: r.note } : {}), ...exportJson(info) };
        writeOut(`${jsonText(out)}\n`);
        return;
      }
      if (r.note) writeErr(`nbd-attach: note: ${r.note}\n`);
      // Names and descriptions are the server's to choose: one line each, escapes visible (src/text.ts).
      const lines = [
        `export:      ${info.name === '' ? '(default)' : display(info.name)}${info.canonicalName !== undefined ? ` (server calls it '${display(info.canonicalName)}')` : ''}`,
        `size:        ${info.size} bytes (${formatSize(info.size)})`,
        `flags:       ${formatFlags(info.flags)}`,
      ];
      if (info.blockSize) lines.push(`block size:  minimum ${info.blockSize.min}, preferred ${info.blockSize.preferred}, maximum ${info.blockSize.max}`);
      if (info.description) lines.push(`description: ${display(info.description)}`);
      lines.push(`server:      ${describeEndpoint(target.endpoint)} (${r.style}, ${r.via}${target.tls !== false ? ', TLS' : ''})`);
      writeOut(`${lines.join('\n')}\n`);
    });
}
