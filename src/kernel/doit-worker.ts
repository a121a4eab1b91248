// The ioctl attach, run inside a worker_threads Worker (a real OS thread of this process).
//
// include/uapi/linux/nbd.h ioctls, in nbd-client's order: SET_BLKSIZE, SET_SIZE_BLOCKS, CLEAR_SOCK,
// SET_FLAGS, BLKROSET (read-only), SET_TIMEOUT, SET_SOCK, DO_IT, CLEAR_SOCK. All of them come from
// this one thread: the kernel refuses SET_SOCK from a second task ("Device being setup by another
// task"), and DO_IT records this thread's id in /sys/block/nbdN/pid. A signal delivered to the thread
// blocked in DO_IT tears the device down, so every signal is blocked here first (pthread_sigmask):
// the process's signals then go to the main thread, which answers SIGINT/SIGTERM with a DISCONNECT.

import fs from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import * as libc from '../../native-bindings/libc.ts';
import { BLKROSET, NbdIoctl } from './constants.ts';

export interface DoItRequest {
  devicePath: string;
  /** Our dup of the negotiated socket; closed here once the kernel holds its reference. */
  sockFd: number;
  blockSize: number;
  sizeBytes: string; // bigint as decimal string (structured clone handles bigint, but keep it explicit)
  serverFlags: number;
  readOnly: boolean;
  timeout: number;
}

export type DoItMessage =
  | { type: 'started'; tid: number }
  | { type: 'error'; stage: string; message: string; errno?: number; code?: string }
  | { type: 'ended'; ret: number; message?: string; errno?: number; code?: string };

function post(m: DoItMessage): void {
  parentPort!.postMessage(m);
}

function errFields(e: unknown): { message: string; errno?: number; code?: string } {
  if (e instanceof libc.SyscallError) return { message: e.message, errno: e.errno, code: e.code };
  return { message: e instanceof Error ? e.message : String(e) };
}

function run(req: DoItRequest): void {
  let stage = 'pthread_sigmask';
  let devFd = -1;
  let sockFd = req.sockFd;
  const closeSock = (): void => {
    if (sockFd >= 0) {
      try {
        libc.close(sockFd);
      } catch {
        /* already closed */
      }
      sockFd = -1;
    }
  };
  try {
    libc.blockAllSignalsInThisThread();
    stage = `open(${req.devicePath})`;
    devFd = fs.openSync(req.devicePath, fs.constants.O_RDWR);
    const io = (name: keyof typeof NbdIoctl, arg: number | bigint = 0): number => {
      stage = `ioctl(NBD_${name})`;
      return libc.ioctl(devFd, NbdIoctl[name], arg, `NBD_${name}`);
    };
    const size = BigInt(req.sizeBytes);
    io('SET_BLKSIZE', req.blockSize);
    io('SET_SIZE_BLOCKS', size / BigInt(req.blockSize));
    io('CLEAR_SOCK');
    io('SET_FLAGS', req.serverFlags);
    // Always set, both ways: the block device's own read-only flag outlives a disconnect, so an
    // earlier -R attach would otherwise leave this one read-only (nbd-client sets it every time too).
    stage = 'ioctl(BLKROSET)';
    const ro = Buffer.alloc(4);
    ro.writeInt32LE(req.readOnly ? 1 : 0);
    libc.ioctl(devFd, BLKROSET, ro, 'BLKROSET');
    if (req.timeout > 0) io('SET_TIMEOUT', req.timeout);
    io('SET_SOCK', sockFd);
    closeSock(); // the kernel holds its own reference now
  } catch (e) {
    if (devFd >= 0) {
      try {
        libc.ioctl(devFd, NbdIoctl.CLEAR_SOCK, 0, 'NBD_CLEAR_SOCK');
      } catch {
        /* nothing to clear */
      }
      fs.closeSync(devFd);
    }
    closeSock();
    post({ type: 'error', stage, ...errFields(e) });
    return;
  }
  post({ type: 'started', tid: libc.gettid() });
  let ended: DoItMessage;
  try {
    const ret = libc.ioctl(devFd, NbdIoctl.DO_IT, 0, 'NBD_DO_IT');
    ended = { type: 'ended', ret };
  } catch (e) {
    ended = { type: 'ended', ret: -1, ...errFields(e) };
  }
  try {
    libc.ioctl(devFd, NbdIoctl.CLEAR_SOCK, 0, 'NBD_CLEAR_SOCK');
  } catch {
    /* already cleared by a disconnect */
  }
  fs.closeSync(devFd);
  post(ended);
}

run(workerData as DoItRequest);
