// The sidebar's merge of the server's list and this browser's (static/history.js sidebarList):
//   node --test tests/js
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { sidebarList } from '../../static/history.js';

const entry = (session, title, updated, extra = {}) => ({
  session, title, model: 'fake/fake-model', created: updated - 5, updated, messages: 2, running: false, ...extra });

test('without a server list the local list is shown as it is', () => {
  const local = [{ id: 'a', title: 'Local A', updated: 3000, session: 's-a' }, { id: 'b', title: '', updated: 1000 }];
  const items = sidebarList(null, local);
  assert.deepEqual(items.map((c) => [c.id, c.session, c.title, c.updated, c.remote]),
    [['a', 's-a', 'Local A', 3000, false], ['b', null, '', 1000, false]]);
});

test('the server list wins for the sessions it has: its titles, its times, its running flag', () => {
  const server = [entry('s-a', 'Renamed elsewhere', 20, { running: true })];
  const local = [{ id: 'a', title: 'Local title', updated: 3000, session: 's-a' }];
  const [item, ...rest] = sidebarList(server, local);
  assert.equal(rest.length, 0, 'a conversation is listed once, not once per source');
  assert.deepEqual(item, { id: 'a', session: 's-a', title: 'Renamed elsewhere', updated: 20000, running: true, remote: true });
});

test('conversations from other browsers come without a local copy (id null)', () => {
  const items = sidebarList([entry('s-x', 'From the laptop', 50)], []);
  assert.deepEqual(items.map((c) => [c.id, c.session, c.title, c.remote]), [[null, 's-x', 'From the laptop', true]]);
});

test('local-only conversations are kept, in time order with the server entries', () => {
  const server = [entry('s-new', 'new', 30), entry('s-old', 'old', 10)];
  const local = [
    { id: 'unsent', title: 'not on the server yet', updated: 20000, session: null },
    { id: 'gone', title: 'from before a restart', updated: 5000, session: 's-gone' },
    { id: 'old', title: 'old here', updated: 10000, session: 's-old' },
  ];
  assert.deepEqual(sidebarList(server, local).map((c) => c.id || c.session), ['s-new', 'unsent', 'old', 'gone']);
});

test('an empty server title falls back to the local one; bad entries are skipped', () => {
  const server = [entry('s-a', '', 40), null, { title: 'no session' }, entry('s-a', 'dup', 39)];
  const items = sidebarList(server, [{ id: 'a', title: 'Mine', updated: 1, session: 's-a' }]);
  assert.deepEqual(items.map((c) => [c.session, c.title]), [['s-a', 'Mine']]);
});
