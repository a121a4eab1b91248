// `npm run deb`: builds dist/ (scripts/build.mjs), then dist/nbd-attach_<version>_<arch>.deb with
// dpkg-deb, for this machine's architecture. Nothing is downloaded: the runtime packages are copied
// from node_modules as `npm ci` installed them. The package holds
//
//   /usr/sbin/nbd-attach             a sh launcher: /usr/bin/node /usr/lib/nbd-attach/nbd-attach.mjs
//   /usr/lib/nbd-attach/             dist/ (+ source maps) and node_modules/ with the runtime
//                                    dependencies of package-lock.json (debug, ms, koffi
//                                    and its native module for this architecture only)
//   /usr/share/man/man8/nbd-attach.8.gz, /usr/share/man/man5/nbdtab.5.gz   (packaging/man/)
//   /usr/share/doc/nbd-attach/copyright
//   whatever packaging/ holds for other parts of the system (packaging/README.md):
//     packaging/systemd/**         → /usr/lib/systemd/system/
//     packaging/initramfs-tools/** → /usr/share/initramfs-tools/
//     packaging/dracut/**          → /usr/lib/dracut/modules.d/
//     packaging/dracut.conf.d/**   → /usr/lib/dracut/dracut.conf.d/
//     packaging/boot/files.sh      → /usr/lib/nbd-attach/boot-files.sh (what the initramfs hooks copy)
//     packaging/debian/{preinst,postinst,prerm,postrm}   → the package's maintainer scripts
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import zlib from 'node:zlib';
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { build } from './build.mjs';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const PKG = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8'));
const LIB = 'usr/lib/nbd-attach';
/** packaging/<dir> → where its files go, the tree below it kept. */
export const SYSTEM_DIRS = {
  systemd: 'usr/lib/systemd/system',
  'initramfs-tools': 'usr/share/initramfs-tools',
  dracut: 'usr/lib/dracut/modules.d',
  'dracut.conf.d': 'usr/lib/dracut/dracut.conf.d',
};
const MAINTAINER_SCRIPTS = ['preinst', 'postinst', 'prerm', 'postrm'];
/** Platform directories of koffi's prebuilt native modules (koffi.node), e.g. linux_x64, musl_x64. */
const NATIVE_DIR = /^(linux|musl|darwin|freebsd|openbsd|win32|android)_[a-z0-9]+$/;
/** Files of a package that nothing loads at run time: C/C++ sources, build files, docs, typings. */
const NOT_AT_RUN_TIME = /(\.(cc|hh|h|c|cpp|hpp|S|asm|inc|def|d\.ts|d\.mts|d\.cts|md|markdown)|^CMakeLists\.txt|^cnoke\.cjs)$/i;
const NOT_AT_RUN_TIME_DIRS = new Set(['doc', 'docs', 'vendor', 'test', 'tests', 'typings', '.github']);

function die(message) {
  process.stderr.write(`deb: ${message}\n`);
  process.exit(1);
}

function run(cmd, args) {
  try {
    return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim();
  } catch (err) {
    if (err.code === 'ENOENT') die(`${cmd} is missing: apt-get install dpkg-dev (or dpkg)`);
    die(`${cmd} ${args.join(' ')} failed: ${err.stderr || err.message}`);
  }
}

/** The runtime packages: package-lock.json's non-dev entries that npm installed here (this platform's optional ones). */
function runtimePackages() {
  const lock = JSON.parse(fs.readFileSync(path.join(ROOT, 'package-lock.json'), 'utf8'));
  const out = [];
  for (const [where, entry] of Object.entries(lock.packages)) {
    if (where === '' || entry.dev || !where.startsWith('node_modules/')) continue;
    if (where.slice('node_modules/'.length).includes('node_modules/')) die(`nested ${where}: not handled; flatten the dependencies`);
    const dir = path.join(ROOT, where);
    if (!fs.existsSync(dir)) {
      if (entry.optional) continue; // another platform's native module
      die(`${where} is missing: run \`npm ci\` first`);
    }
    out.push(where.slice('node_modules/'.length));
  }
  return out;
}

/** Copy a package's run-time files; koffi's native modules only for this platform. */
function copyPackage(from, to) {
  const keepNative = `linux_${process.arch}`;
  const walk = (src, dst) => {
    for (const e of fs.readdirSync(src, { withFileTypes: true })) {
      const s = path.join(src, e.name);
      const d = path.join(dst, e.name);
      if (e.isDirectory()) {
        if (NOT_AT_RUN_TIME_DIRS.has(e.name)) continue;
        if (NATIVE_DIR.test(e.name) && e.name !== keepNative) continue;
        walk(s, d);
      } else if (e.isFile()) {
        if (NOT_AT_RUN_TIME.test(e.name) && !/^licen[cs]e/i.test(e.name)) continue;
        fs.mkdirSync(dst, { recursive: true }); // only directories with files: no empty ones left behind
        fs.copyFileSync(s, d);
        fs.chmodSync(d, 0o644); // loaded, never executed
      }
    }
  };
  walk(from, to);
}

/** Copy a directory tree keeping executable bits (0755) and making the rest 0644. */
function copyTree(from, to) {
  for (const e of fs.readdirSync(from, { withFileTypes: true })) {
    const s = path.join(from, e.name);
    const d = path.join(to, e.name);
    if (e.isDirectory()) copyTree(s, d);
    else if (e.isFile() && !e.name.startsWith('.')) {
      fs.mkdirSync(to, { recursive: true });
      fs.copyFileSync(s, d);
      fs.chmodSync(d, fs.statSync(s).mode & 0o100 ? 0o755 : 0o644);
    }
  }
}

function gzipTo(from, to) {
  fs.mkdirSync(path.dirname(to), { recursive: true });
  // -n: no name or time stamp in the header, as dh_installman does.
  fs.writeFileSync(to, zlib.gzipSync(fs.readFileSync(from), { level: 9 }));
  fs.chmodSync(to, 0o644);
}

function duKiB(dir) {
  let bytes = 0;
  const walk = (d) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else bytes += Math.ceil(fs.lstatSync(p).size / 1024) * 1024;
    }
  };
  walk(dir);
  return Math.ceil(bytes / 1024);
}

export async function buildDeb({ outdir = path.join(ROOT, 'dist') } = {}) {
  if (process.platform !== 'linux') die('a Debian package is built on Linux');
  const arch = run('dpkg', ['--print-architecture']);
  const dist = await build();
  const stage = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-attach-deb-'));
  try {
    fs.chmodSync(stage, 0o755);
    const lib = path.join(stage, LIB);
    fs.mkdirSync(lib, { recursive: true });
    for (const name of fs.readdirSync(dist)) {
      if (!name.endsWith('.mjs') && !name.endsWith('.mjs.map')) continue;
      fs.copyFileSync(path.join(dist, name), path.join(lib, name));
      fs.chmodSync(path.join(lib, name), 0o644);
    }
    for (const name of runtimePackages()) copyPackage(path.join(ROOT, 'node_modules', name), path.join(lib, 'node_modules', name));
    fs.copyFileSync(path.join(ROOT, 'packaging/boot/files.sh'), path.join(lib, 'boot-files.sh'));
    fs.chmodSync(path.join(lib, 'boot-files.sh'), 0o644);

    const sbin = path.join(stage, 'usr/sbin');
    fs.mkdirSync(sbin, { recursive: true });
    fs.writeFileSync(
      path.join(sbin, 'nbd-attach'),
      `#!/bin/sh\n# nbd-attach(8): the program in /${LIB}, run by the system's Node.js (>= 20).\nexec /usr/bin/node /${LIB}/nbd-attach.mjs "$@"\n`,
      { mode: 0o755 },
    );
    fs.chmodSync(path.join(sbin, 'nbd-attach'), 0o755);

    const man = path.join(ROOT, 'packaging/man');
    for (const page of fs.readdirSync(man)) {
      const m = /\.([1-9])$/.exec(page);
      if (m) gzipTo(path.join(man, page), path.join(stage, `usr/share/man/man${m[1]}`, `${page}.gz`));
    }
    const doc = path.join(stage, 'usr/share/doc/nbd-attach');
    fs.mkdirSync(doc, { recursive: true });
    fs.copyFileSync(path.join(ROOT, 'packaging/copyright'), path.join(doc, 'copyright'));
    fs.chmodSync(path.join(doc, 'copyright'), 0o644);

    for (const [dir, dest] of Object.entries(SYSTEM_DIRS)) {
      const src = path.join(ROOT, 'packaging', dir);
      if (fs.existsSync(src)) copyTree(src, path.join(stage, dest));
    }

    const control = path.join(stage, 'DEBIAN');
    fs.mkdirSync(control, { mode: 0o755 });
    for (const script of MAINTAINER_SCRIPTS) {
      const src = path.join(ROOT, 'packaging/debian', script);
      if (fs.existsSync(src)) {
        fs.copyFileSync(src, path.join(control, script));
        fs.chmodSync(path.join(control, script), 0o755);
      }
    }
    const description = PKG.description.replace(/\s+/g, ' ');
    fs.writeFileSync(
      path.join(control, 'control'),
      [
        'Package: nbd-attach',
        `Version: ${PKG.version}`,
        `Architecture: ${arch}`,
        'Maintainer: nbd-attach developers <root@localhost>',
        `Installed-Size: ${duKiB(stage)}`,
        // Debian 12 ships Node.js 18: install Node.js 20 or later from NodeSource or similar first.
        'Depends: nodejs (>= 20)',
        'Recommends: kmod',
        'Section: admin',
        'Priority: optional',
        `Description: ${description.split(': ')[0]}`,
        ' nbd-attach connects to a Network Block Device server (nbd-server, nbdkit,',
        ' qemu-nbd or its own built-in server), negotiates an export, hands the socket',
        " to the kernel's nbd driver (/dev/nbdN) and stays resident to supervise the",
        ' device and reconnect. It accepts the command line of nbd-client and reads',
        ' /etc/nbdtab.',
        '',
      ].join('\n'),
    );
    fixDirModes(stage, 0o755);
    fs.mkdirSync(outdir, { recursive: true });
    const deb = path.join(outdir, `nbd-attach_${PKG.version}_${arch}.deb`);
    run('dpkg-deb', ['--root-owner-group', '-Zxz', '--build', stage, deb]);
    return deb;
  } finally {
    fs.rmSync(stage, { recursive: true, force: true });
  }
}

function fixDirModes(dir, mode) {
  fs.chmodSync(dir, mode);
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) if (e.isDirectory()) fixDirModes(path.join(dir, e.name), mode);
}

if (process.argv[1] && fs.realpathSync(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const deb = await buildDeb();
  process.stdout.write(`deb: ${path.relative(process.cwd(), deb)}\n`);
}
