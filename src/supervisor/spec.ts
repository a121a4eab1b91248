// What an attach is asked to do, already resolved by the command layer (src/commands/attach.ts
// parses positionals, URIs and nbdtab): the supervisor layer never parses a command line.

import type { Target } from '../address.ts';

export type AttachSpec =
  /** `nbd-attach HOST[:PORT] [PORT] [DEV]`, `-u SOCK [DEV]`, a URI. */
  | { kind: 'remote'; target: Target; exportName: string; device: string | undefined }
  /** `--file IMAGE [DEV]` / `--memory SIZE [DEV]`: served from the resident process itself. */
  | { kind: 'local'; file: string | undefined; memory: string | undefined; device: string | undefined }
  /** `--reattach DEV [HOST]`: supervise an attached device again. */
  | { kind: 'reattach'; device: string; given: { target: Target; exportName: string } | undefined };

/** The options of `attach` the supervisor layer reads (src/commands/attach.ts declares them). */
export interface SupervisedAttachOptions {
  connectTimeout: number;
  optgo: boolean;
  blockSize?: number | 'preferred';
  timeout?: number;
  identifier?: string;
  readOnly?: boolean;
  foreground?: boolean;
  deadTimeout?: number;
  connections?: number;
  supervisorChild?: boolean;
  ioctl?: boolean;
  /** -s: the device holds swap. */
  swap?: boolean;
  /** -m: mark argv[0] with '@' for systemd. */
  systemdMark?: boolean;
}
