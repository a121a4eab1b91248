// qemu's user-mode network runs this for each connection the guest opens to the guestfwd address
// (`guestfwd=tcp:ADDR:PORT-cmd:node relay.mjs PORT`): stdin/stdout are the guest's connection, and it
// relays them to 127.0.0.1:PORT on the host, where the NBD server listens. A refused or dropped
// connection ends the process, which the guest sees as its connection closing.
import net from 'node:net';

const port = Number(process.argv[2]);
const s = net.connect(port, '127.0.0.1');
s.on('error', () => process.exit(0));
s.on('close', () => process.exit(0));
process.stdin.on('error', () => process.exit(0));
process.stdin.on('end', () => s.end());
process.stdin.pipe(s);
s.pipe(process.stdout);
