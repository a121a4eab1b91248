// The shipped forms of nbd-attach, on the host (no root needed except for `dpkg --root`):
//  - `npm run build` writes dist/, and the built CLI runs from it, writes nothing, and loads only
//    what the command needs (--version: nothing; --help and check: no TLS, worker, debug or koffi);
//  - `npm pack` gives a tarball that installs offline (from npm's cache, as `npm ci` filled it) and
//    runs `nbd-attach --version` and `--help`;
//  - `npm run deb` gives a Debian package whose files, launcher, man pages, koffi (this machine's
//    native module only) and install/removal under `dpkg --root` are checked.
// The tests of this file run in order (build, then pack and deb from the same dist/).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync, type SpawnSyncOptions } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { REPO } from '../lib/servers.ts';

const PKG = JSON.parse(fs.readFileSync(path.join(REPO, 'package.json'), 'utf8')) as {
  version: string;
  license: string;
  dependencies: Record<string, string>;
  bin: Record<string, string>;
  engines: Record<string, string>;
};
const DIST = path.join(REPO, 'dist');
const CLI = path.join(DIST, 'nbd-attach.mjs');
const ARCH = process.arch;

interface Ran {
  code: number | null;
  stdout: string;
  stderr: string;
}

function run(cmd: string, args: readonly string[], opts: SpawnSyncOptions = {}): Ran {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 180_000, ...opts });
  if (r.error) throw r.error;
  return { code: r.status, stdout: String(r.stdout ?? ''), stderr: String(r.stderr ?? '') };
}

function mustRun(cmd: string, args: readonly string[], opts: SpawnSyncOptions = {}): string {
  const r = run(cmd, args, opts);
  assert.equal(r.code, 0, `${cmd} ${args.join(' ')} exited ${r.code}:\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

function tmp(t: { after(fn: () => void): void }, name: string): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `nbd-${name}-`));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Every file below `dir` (relative), with its size and mtime: a picture to compare before/after. */
function listing(dir: string): string[] {
  return (fs.readdirSync(dir, { recursive: true }) as string[])
    .map((rel) => {
      const st = fs.lstatSync(path.join(dir, rel));
      return `${rel} ${st.isDirectory() ? 'dir' : st.size} ${st.mtimeMs}`;
    })
    .sort();
}

/** Which built-in modules and CommonJS packages one run of the built CLI loaded. */
function loadedBy(args: string[], t: { after(fn: () => void): void }, env: NodeJS.ProcessEnv = {}): { builtins: Set<string>; packages: Set<string>; stdout: string } {
  const dir = tmp(t, 'probe');
  const probe = path.join(dir, 'probe.cjs');
  const report = path.join(dir, 'loaded.json');
  fs.writeFileSync(
    probe,
    `process.on('exit', () => require('fs').writeFileSync(${JSON.stringify(report)}, JSON.stringify({
      builtins: process.moduleLoadList.filter((m) => m.startsWith('NativeModule ')).map((m) => m.slice(13)),
      cjs: Object.keys(require.cache) })));\n`,
  );
  // stdout to a file (--help asks process.stdout whether it is a terminal: a pipe would load node:net
  // for that stream); stderr a pipe, so a command that writes its errors through process.stderr
  // shows node:net (src/output.ts writes to the descriptors instead).
  const out = path.join(dir, 'stdout');
  const fd = fs.openSync(out, 'w');
  try {
    run(process.execPath, ['--require', probe, CLI, ...args], { stdio: ['ignore', fd, 'pipe'], timeout: 30_000, env: { ...process.env, ...env } });
  } finally {
    fs.closeSync(fd);
  }
  const r = JSON.parse(fs.readFileSync(report, 'utf8')) as { builtins: string[]; cjs: string[] };
  const packages = new Set(r.cjs.filter((f) => f.includes('node_modules')).map((f) => f.split('node_modules/').pop()!.split('/')[0]!));
  return { builtins: new Set(r.builtins), packages, stdout: fs.readFileSync(out, 'utf8') };
}

test('npm run build writes dist/: the CLI, the -L worker beside it, source maps', () => {
  mustRun('npm', ['run', '--silent', 'build'], { cwd: REPO });
  for (const f of ['nbd-attach.mjs', 'nbd-attach.mjs.map', 'doit-worker.mjs', 'doit-worker.mjs.map']) {
    assert.ok(fs.existsSync(path.join(DIST, f)), `dist/${f}`);
  }
  assert.match(fs.readFileSync(CLI, 'utf8'), /^#!\/usr\/bin\/env node\n/);
  // The source maps name the sources where they are (stack traces with DEBUG set point into src/).
  const map = JSON.parse(fs.readFileSync(path.join(DIST, 'nbd-attach.mjs.map'), 'utf8')) as { sources: string[] };
  assert.deepEqual(map.sources, ['../src/main.ts']);
  assert.equal(PKG.bin['nbd-attach'], 'dist/nbd-attach.mjs');
  // Every chunk a module imports is there (a broken chunk name would fail only the command using it).
  for (const f of fs.readdirSync(DIST).filter((n) => n.endsWith('.mjs'))) {
    for (const m of fs.readFileSync(path.join(DIST, f), 'utf8').matchAll(/from\s*"\.\/([^"]+)"|import\("\.\/([^"]+)"\)/g)) {
      const dep = m[1] ?? m[2]!;
      assert.ok(fs.existsSync(path.join(DIST, dep)), `dist/${f} imports ./${dep}`);
    }
  }
});

test('the built CLI runs from dist/, writes nothing there, and loads only what the command uses', (t) => {
  const before = listing(DIST);
  const version = run(process.execPath, [CLI, '--version']);
  assert.equal(version.code, 0, version.stderr);
  assert.equal(version.stdout, `${PKG.version}\n`);
  const help = run(process.execPath, [CLI, '--help']);
  assert.equal(help.code, 0, help.stderr);
  assert.match(help.stdout, /Attach a Network Block Device export/);
  for (const c of ['attach', 'detach', 'check', 'status', 'list', 'info', 'serve', 'mknod']) assert.match(help.stdout, new RegExp(`^  ${c}\\b`, 'm'));
  // A command with an error: one line, and the exit code of the README's table.
  const bad = run(process.execPath, [CLI, 'serve', '--tls', 'bogus']);
  assert.equal(bad.code, 2, bad.stderr);
  assert.match(bad.stderr, /^nbd-attach: /);
  assert.deepEqual(listing(DIST), before, 'running the CLI changed nothing in dist/');

  const v = loadedBy(['--version'], t);
  assert.equal(v.stdout, `${PKG.version}\n`);
  assert.deepEqual([...v.packages], [], '--version loads no package');
  for (const b of ['net', 'tty', 'child_process']) assert.ok(!v.builtins.has(b), `--version loads node:${b}`);
  for (const args of [['--help'], ['check', 'nbd4095'], ['detach', 'nbd4095']]) {
    const l = loadedBy(args, t);
    // commander is bundled into dist/ (scripts/build.mjs), with node:child_process loaded only to spawn.
    assert.ok(!l.packages.has('commander'), `${args.join(' ')} loads commander from node_modules`);
    const heavy = ['tls', '_tls_wrap', 'worker_threads', 'tty', 'child_process', ...(args[0] === 'detach' ? [] : ['crypto'])];
    // check and detach print with src/output.ts: no stdio stream, no node:net (stderr is a pipe here).
    if (args[0] !== '--help') heavy.push('net');
    for (const b of heavy) assert.ok(!l.builtins.has(b), `${args.join(' ')} loads node:${b}`);
    // debug (and ms, node:tty) only with DEBUG set (src/debug.ts); koffi only for a syscall.
    for (const p of ['koffi', 'debug', 'ms']) assert.ok(!l.packages.has(p), `${args.join(' ')} loads ${p}`);
  }
  // And the probe can see them: `list` loads the client but TLS only when asked for, and debug
  // only with DEBUG set.
  const list = loadedBy(['list', '127.0.0.1:1', '--connect-timeout', '1'], t);
  assert.ok(!list.packages.has('debug') && !list.builtins.has('tty'), 'list without DEBUG loads no debug');
  assert.ok(!list.builtins.has('tls'), 'a plain list does not load node:tls');
  const debugList = loadedBy(['list', '127.0.0.1:1', '--connect-timeout', '1'], t, { DEBUG: 'nbd:*' });
  assert.ok(debugList.packages.has('debug'), 'list with DEBUG=nbd:* loads debug (the probe sees packages)');
  const listTls = loadedBy(['list', '-x', '--no-tls-verify', '127.0.0.1:1', '--connect-timeout', '1'], t);
  assert.ok(listTls.builtins.has('tls'), 'list -x loads node:tls');
});

test('npm pack: the tarball holds dist/ and the man pages, and installs and runs offline', (t) => {
  const dir = tmp(t, 'pack');
  // --ignore-scripts: dist/ was just built; pack would otherwise run `prepare` again.
  const packed = JSON.parse(mustRun('npm', ['pack', '--ignore-scripts', '--json', '--pack-destination', dir], { cwd: REPO })) as { filename: string; files: { path: string }[] }[];
  const files = packed[0]!.files.map((f) => f.path);
  for (const f of ['package.json', 'README.md', 'dist/nbd-attach.mjs', 'dist/doit-worker.mjs', 'packaging/man/nbd-attach.8', 'packaging/man/nbdtab.5']) assert.ok(files.includes(f), `the tarball has ${f}`);
  assert.deepEqual(files.filter((f) => /^(src|test|scripts|native-bindings)\/|\.deb$|\.ts$/.test(f)), [], 'no sources, tests or packages in the tarball');

  // Offline: `npm ci` caches the packages' tarballs but not their registry documents, so a plain
  // `npm install --offline TARBALL` cannot resolve versions. A lock file made from ours (runtime
  // entries only) pins them: this is the install of the tarball as a user would get it.
  const app = path.join(dir, 'app');
  fs.mkdirSync(app);
  const tgz = packed[0]!.filename;
  fs.renameSync(path.join(dir, tgz), path.join(app, tgz));
  const ours = JSON.parse(fs.readFileSync(path.join(REPO, 'package-lock.json'), 'utf8')) as { packages: Record<string, { dev?: boolean }> };
  const integrity = `sha512-${crypto.createHash('sha512').update(fs.readFileSync(path.join(app, tgz))).digest('base64')}`;
  const deps = { 'nbd-attach': `file:${tgz}` };
  const packages: Record<string, unknown> = {
    '': { name: 'nbd-attach-install-test', dependencies: deps },
    'node_modules/nbd-attach': { version: PKG.version, resolved: `file:${tgz}`, integrity, license: PKG.license, dependencies: PKG.dependencies, bin: PKG.bin, engines: PKG.engines },
  };
  for (const [where, entry] of Object.entries(ours.packages)) if (where !== '' && !entry.dev) packages[where] = entry;
  fs.writeFileSync(path.join(app, 'package.json'), JSON.stringify({ name: 'nbd-attach-install-test', private: true, dependencies: deps }));
  fs.writeFileSync(path.join(app, 'package-lock.json'), JSON.stringify({ name: 'nbd-attach-install-test', lockfileVersion: 3, requires: true, packages }));
  mustRun('npm', ['ci', '--offline', '--no-audit', '--no-fund', '--loglevel=error'], { cwd: app, timeout: 180_000 });
  const bin = path.join(app, 'node_modules/.bin/nbd-attach');
  assert.equal(mustRun(bin, ['--version']), `${PKG.version}\n`);
  assert.match(mustRun(bin, ['--help']), /Attach a Network Block Device export/);
  const installed = path.join(app, 'node_modules/nbd-attach');
  assert.ok(!fs.existsSync(path.join(installed, 'src')), 'the installed package runs dist/, not sources');
  assert.ok(!fs.existsSync(path.join(installed, 'node_modules/tsx')) && !fs.existsSync(path.join(app, 'node_modules/esbuild')), 'no build tools installed');
});

test('npm run deb: a Debian package with the launcher, the app, man pages; it installs and removes cleanly', (t) => {
  const out = mustRun('npm', ['run', '--silent', 'deb'], { cwd: REPO, timeout: 300_000 });
  const debArch = mustRun('dpkg', ['--print-architecture']).trim();
  const deb = path.join(DIST, `nbd-attach_${PKG.version}_${debArch}.deb`);
  assert.ok(fs.existsSync(deb), `${deb} (npm run deb said: ${out})`);

  const field = (name: string): string => mustRun('dpkg-deb', ['--field', deb, name]).trim();
  assert.equal(field('Package'), 'nbd-attach');
  assert.equal(field('Version'), PKG.version);
  assert.equal(field('Architecture'), debArch);
  assert.equal(field('Depends'), 'nodejs (>= 20)');

  const contents = mustRun('dpkg-deb', ['--contents', deb])
    .split('\n')
    .filter(Boolean)
    .map((l) => l.split(/\s+/).slice(5).join(' ').replace(/^\.\//, '/'));
  for (const f of ['/usr/sbin/nbd-attach', '/usr/lib/nbd-attach/nbd-attach.mjs', '/usr/lib/nbd-attach/doit-worker.mjs', '/usr/share/man/man8/nbd-attach.8.gz', '/usr/share/man/man5/nbdtab.5.gz', '/usr/share/doc/nbd-attach/copyright']) {
    assert.ok(contents.includes(f), `the package has ${f}`);
  }
  for (const p of ['debug', 'ms', 'koffi']) assert.ok(contents.includes(`/usr/lib/nbd-attach/node_modules/${p}/package.json`), `the package has ${p}`);
  assert.ok(!contents.some((f) => f.includes('/node_modules/commander/')), 'commander is bundled into the modules, not shipped as a package');
  const natives = contents.filter((f) => f.endsWith('.node'));
  assert.ok(natives.length >= 1, 'koffi has its native module');
  assert.deepEqual(natives.filter((f) => !f.includes(`/linux_${ARCH}/`)), [], `only linux_${ARCH} native modules`);
  assert.deepEqual(contents.filter((f) => /\.(cc|hh|S|asm|ts)$|\/(esbuild|tsx|typescript)\//.test(f)), [], 'no C sources, typings or build tools');
  // Whatever packaging/systemd holds is installed as units.
  const units = path.join(REPO, 'packaging/systemd');
  if (fs.existsSync(units)) for (const u of fs.readdirSync(units)) assert.ok(contents.includes(`/usr/lib/systemd/system/${u}`), `unit ${u}`);

  // Unpacked (dpkg -x): the app runs with this machine's node, the launcher runs it, koffi loads.
  const root = tmp(t, 'deb-x');
  mustRun('dpkg-deb', ['-x', deb, root]);
  const app = path.join(root, 'usr/lib/nbd-attach');
  assert.equal(mustRun(process.execPath, [path.join(app, 'nbd-attach.mjs'), '--version']), `${PKG.version}\n`);
  assert.match(mustRun(process.execPath, [path.join(app, 'nbd-attach.mjs'), '--help']), /Attach a Network Block Device export/);
  const launcher = fs.readFileSync(path.join(root, 'usr/sbin/nbd-attach'), 'utf8');
  assert.match(launcher, /^#!\/bin\/sh\n/);
  assert.match(launcher, /^exec \/usr\/bin\/node \/usr\/lib\/nbd-attach\/nbd-attach\.mjs "\$@"$/m);
  assert.ok(fs.statSync(path.join(root, 'usr/sbin/nbd-attach')).mode & 0o111, 'the launcher is executable');
  // The same launcher pointed at the unpacked tree and this node.
  const relocated = launcher.replaceAll('/usr/bin/node', process.execPath).replaceAll('/usr/lib/nbd-attach', app);
  assert.equal(mustRun('sh', ['-c', relocated, 'nbd-attach', '--version']), `${PKG.version}\n`);
  const koffi = mustRun(process.execPath, ['-e', `const k = require(${JSON.stringify(path.join(app, 'node_modules/koffi'))}); process.stdout.write(typeof k.load)`]);
  assert.equal(koffi, 'function', 'koffi loads its native module from the package');

  // The man pages render without warnings.
  for (const page of ['man8/nbd-attach.8.gz', 'man5/nbdtab.5.gz']) {
    const r = run('man', ['--warnings', '-l', path.join(root, 'usr/share/man', page)], { env: { ...process.env, MANWIDTH: '80', MAN_KEEP_FORMATTING: '' } });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stderr, '', `${page}: no roff warnings`);
    assert.match(r.stdout, /^NAME$/m);
    assert.match(r.stdout, new RegExp(`nbd-attach ${PKG.version.replace(/\./g, '\\.')}`), `${page} names version ${PKG.version}`);
  }

  // Installed into a throwaway root with dpkg itself, then removed: nothing may remain.
  if (process.getuid?.() !== 0) assert.fail('installing with dpkg --root needs root: run this test as root (CI does)');
  const sysroot = tmp(t, 'deb-root');
  const admin = path.join(sysroot, 'var/lib/dpkg');
  for (const d of ['info', 'updates', 'triggers']) fs.mkdirSync(path.join(admin, d), { recursive: true });
  fs.writeFileSync(path.join(admin, 'status'), '');
  fs.writeFileSync(path.join(admin, 'available'), '');
  const dpkg = (...args: string[]): string => mustRun('dpkg', [`--root=${sysroot}`, '--force-depends', '--force-not-root', '--log=/dev/null', ...args], { env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
  dpkg('--install', deb);
  assert.match(mustRun('dpkg', [`--root=${sysroot}`, '--status', 'nbd-attach']), /^Status: install ok installed$/m);
  assert.ok(fs.existsSync(path.join(sysroot, 'usr/sbin/nbd-attach')));
  assert.equal(mustRun(process.execPath, [path.join(sysroot, 'usr/lib/nbd-attach/nbd-attach.mjs'), '--version']), `${PKG.version}\n`);
  dpkg('--purge', 'nbd-attach');
  const left = (fs.readdirSync(sysroot, { recursive: true }) as string[]).filter((rel) => !rel.startsWith('var'));
  assert.deepEqual(left, [], 'removal leaves nothing behind');
});
