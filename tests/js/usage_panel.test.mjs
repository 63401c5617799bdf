// The settings dialog's usage summary (static/usage.js summarizeUsage):  node --test tests/js
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { summarizeUsage } from '../../static/usage.js';

const byDay = {
  totals: { replies: 5, input_tokens: 25, output_tokens: 9, cached_replies: 0 },
  rows: [{ day: '2026-12-01', replies: 3, input_tokens: 15, output_tokens: 6 },
    { day: '2026-12-02', replies: 2, input_tokens: 10, output_tokens: 3 }],
};
const byModel = {
  totals: byDay.totals,
  rows: [{ model: 'a/small', replies: 1, input_tokens: 5, output_tokens: 1 },
    { model: 'b/large', replies: 4, input_tokens: 20, output_tokens: 8 }],
};

test('today is its own day row, the month the totals, models the most tokens first', () => {
  const s = summarizeUsage(byDay, byModel, '2026-12-02');
  assert.deepEqual(s.today, { replies: 2, input_tokens: 10, output_tokens: 3 });
  assert.deepEqual(s.month, { replies: 5, input_tokens: 25, output_tokens: 9 });
  assert.deepEqual(s.models.map((m) => [m.model, m.replies]), [['b/large', 4], ['a/small', 1]]);
});

test('a day without replies is zeros, not missing', () => {
  const s = summarizeUsage(byDay, { rows: [] }, '2026-12-03');
  assert.deepEqual(s.today, { replies: 0, input_tokens: 0, output_tokens: 0 });
  assert.deepEqual(s.models, []);
});
