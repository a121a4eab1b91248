// The built-in server's default limits, in a module of their own so that `serve`'s option
// declarations (src/commands/serve.ts) name them without loading the server.

/** A client must finish negotiating within this (qemu-nbd's default; 0 on the command line: no limit). */
export const DEFAULT_HANDSHAKE_TIMEOUT_MS = 10_000;
/** Connections open at once, in total and from one IP address (not for Unix sockets). */
export const DEFAULT_MAX_CONNECTIONS = 128;
export const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS = 32;
