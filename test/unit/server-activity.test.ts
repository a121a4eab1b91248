// Bookkeeping of the built-in server's lifecycle rules: storage operations per export (a new
// connection waits for earlier writes) and the process-wide payload budget.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { ExportActivity, activityOf } from '../../src/server/activity.ts';
import { PayloadBudget } from '../../src/server/budget.ts';

const settled = async (p: Promise<void>): Promise<boolean> => {
  let done = false;
  void p.then(() => (done = true));
  for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
  return done;
};

describe('ExportActivity', () => {
  it('a barrier waits for the operations started before it, not for later ones', async () => {
    const a = new ExportActivity();
    assert.equal(await settled(a.barrier()), true, 'nothing running: at once');
    const first = a.begin();
    const second = a.begin();
    const barrier = a.barrier();
    const later = a.begin();
    assert.equal(a.inProgress, 3);
    a.end(second);
    assert.equal(await settled(barrier), false, 'the first is still running');
    a.end(first);
    assert.equal(await settled(barrier), true, 'a later operation does not hold it');
    a.end(later);
    a.end(later); // twice: ignored
    assert.equal(a.inProgress, 0);
  });

  it('is one record per backend object', () => {
    const b1 = {};
    assert.equal(activityOf(b1), activityOf(b1));
    assert.notEqual(activityOf(b1), activityOf({}));
  });
});

describe('PayloadBudget', () => {
  it('over budget, only a connection with nothing in flight may take a request; waiters wake when under', async () => {
    const b = new PayloadBudget(100);
    assert.equal(b.allows(0), true);
    b.take(150);
    assert.equal(b.allows(50), false, 'over budget');
    assert.equal(b.allows(0), true, 'never starved by others');
    let woken = 0;
    b.wait(() => woken++);
    b.give(40); // 110: still over
    await new Promise((r) => setImmediate(r));
    assert.equal(woken, 0);
    b.give(20); // 90
    await new Promise((r) => setImmediate(r));
    assert.equal(woken, 1);
    b.give(90);
    assert.equal(b.held, 0);
  });
});
