#!/usr/bin/env bash
# Lay out /usr/lib/nbd-attach as the Debian package installs it, from this checkout, into DEST:
#   DEST/nbd-attach.mjs, DEST/doit-worker.mjs, DEST/chunk-*.mjs  the built modules (npm run build)
#   DEST/node_modules/{debug,ms,koffi,@koromix/koffi-linux-x64}  run-time packages (commander is in the modules)
#   DEST/boot-files.sh  what the initramfs hooks copy (packaging/boot/files.sh)
# The boot tests point the hooks at DEST with NBD_ATTACH_LIB=DEST.
#
#   packaging/boot/stage-lib.sh DEST
set -euo pipefail
DEST="${1:?usage: stage-lib.sh DEST}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
rm -rf "$DEST"
mkdir -p "$DEST/node_modules"
if [ -f "$ROOT/scripts/build.mjs" ]; then
  # The project's own build (npm run build) writes dist/.
  (cd "$ROOT" && node scripts/build.mjs >/dev/null)
  cp -p "$ROOT"/dist/*.mjs "$DEST/"
else
  # One self-contained module per entry; the worker sits beside the CLI (src/kernel/attach.ts).
  (cd "$ROOT" && node --input-type=module -e "
    import * as esbuild from 'esbuild';
    import fs from 'node:fs';
    const out = process.argv[1];
    fs.writeFileSync(out + '/.entry.ts', \"import { main } from '$ROOT/src/cli.ts';\\nprocess.exitCode = await main(process.argv.slice(2));\\n\");
    await esbuild.build({
      entryPoints: { 'nbd-attach': out + '/.entry.ts', 'doit-worker': '$ROOT/src/kernel/doit-worker.ts' },
      outdir: out, outExtension: { '.js': '.mjs' }, bundle: true, platform: 'node', format: 'esm',
      target: 'node20', packages: 'external', logLevel: 'warning',
    });
    fs.rmSync(out + '/.entry.ts');
  " "$DEST")
fi
for p in debug ms koffi @koromix; do
  [ -e "$ROOT/node_modules/$p" ] || { echo "stage-lib: node_modules/$p is missing: run npm ci" >&2; exit 1; }
  mkdir -p "$DEST/node_modules/$(dirname "$p")"
  cp -pR "$ROOT/node_modules/$p" "$DEST/node_modules/$p"
done
cp -p "$ROOT/packaging/boot/files.sh" "$DEST/boot-files.sh"
echo "$DEST"
