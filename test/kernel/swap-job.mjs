// The swap test's job (test/kernel/swap.test.ts): fills SIZE MiB with a pattern it can check (each
// 4 KiB page: its index, then a byte derived from it), then reads everything back PASSES times.
// Run in a memory cgroup smaller than SIZE, most of it lives in swap. Prints `filled`, then
// `pass N bad=B` per pass; exits 1 on any bad page. Plain JavaScript: starts fast in the VM.
const sizeMiB = Number(process.argv[2]);
const passes = Number(process.argv[3] ?? 2);
const PAGE = 4096;
const pages = (sizeMiB * 1024 * 1024) / PAGE;
const byteOf = (i) => (i * 131 + 7) & 0xff;
const templates = Array.from({ length: 256 }, (_, b) => Buffer.alloc(PAGE, b));
const buf = Buffer.allocUnsafeSlow(pages * PAGE);
for (let i = 0; i < pages; i++) {
  const off = i * PAGE;
  buf.fill(byteOf(i), off, off + PAGE);
  buf.writeUInt32LE(i, off);
}
process.stdout.write('filled\n');
let bad = 0;
for (let p = 1; p <= passes; p++) {
  let badPass = 0;
  for (let i = 0; i < pages; i++) {
    const off = i * PAGE;
    if (buf.readUInt32LE(off) !== i || buf.compare(templates[byteOf(i)], 4, PAGE, off + 4, off + PAGE) !== 0) badPass++;
  }
  bad += badPass;
  process.stdout.write(`pass ${p} bad=${badPass}\n`);
}
process.exitCode = bad === 0 ? 0 : 1;
