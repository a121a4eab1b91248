// Typed errors with stable codes. The message is one line a person can act on, operation first;
// the exit code is derived from the code so the CLI never picks numbers ad hoc.

/** Exit codes, documented in README.md ("Exit codes"). */
export const ExitCode = {
  OK: 0,
  /** Generic failure; also `check` on a device that is not attached (nbd-client semantics). */
  FAILURE: 1,
  /** Wrong flag, argument or address. */
  USAGE: 2,
  /** Could not reach the server: refused, unreachable, timed out, DNS. */
  CONNECT: 3,
  /** The server answered, but negotiation failed: unknown export, policy, TLS required, protocol violation. */
  NEGOTIATION: 4,
  /** The kernel side: module missing, device busy or not an nbd device, kernel refused. */
  KERNEL: 5,
  /** Not root / lacks CAP_SYS_ADMIN. */
  PERMISSION: 6,
} as const;
export type ExitCodeValue = (typeof ExitCode)[keyof typeof ExitCode];

const EXIT_BY_CODE: Record<string, ExitCodeValue> = {
  NBD_E_USAGE: ExitCode.USAGE,
  NBD_E_ADDRESS: ExitCode.USAGE,
  NBD_E_CONNECT: ExitCode.CONNECT,
  NBD_E_CONNECT_TIMEOUT: ExitCode.CONNECT,
  NBD_E_HANDSHAKE_TIMEOUT: ExitCode.NEGOTIATION,
  NBD_E_PROTOCOL: ExitCode.NEGOTIATION,
  NBD_E_SERVER_CLOSED: ExitCode.NEGOTIATION,
  NBD_E_OPTION: ExitCode.NEGOTIATION,
  NBD_E_EXPORT_UNKNOWN: ExitCode.NEGOTIATION,
  NBD_E_TLS_REQUIRED: ExitCode.NEGOTIATION,
  /** TLS could not be negotiated: no STARTTLS, certificate not trusted, TLS handshake failed. */
  NBD_E_TLS: ExitCode.NEGOTIATION,
  NBD_E_UNSUPPORTED: ExitCode.NEGOTIATION,
  NBD_E_PERMISSION: ExitCode.PERMISSION,
};

export class NbdError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'NbdError';
    this.code = code;
  }
  get exitCode(): ExitCodeValue {
    if (this.code in EXIT_BY_CODE) return EXIT_BY_CODE[this.code]!;
    if (this.code.startsWith('NBD_E_KERNEL') || this.code.startsWith('NBD_E_DEVICE')) return ExitCode.KERNEL;
    return ExitCode.FAILURE;
  }
}

/** Exit code for anything thrown: NbdError knows its own; anything else is a generic failure. */
export function exitCodeOf(err: unknown): ExitCodeValue {
  return err instanceof NbdError ? err.exitCode : ExitCode.FAILURE;
}
