// Client defaults that the command line shows in --help: kept apart from negotiate.ts so that
// registering the options does not load sockets and TLS (src/cli.ts loads commands lazily).

/** --connect-timeout: give up connecting and negotiating after this long. */
export const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
