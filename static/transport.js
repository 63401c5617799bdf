// The one interface the page talks to the server through, with two implementations: a
// WebSocket (/ws) and Server-Sent Events (/sse plus a few HTTP calls). Both hand the same
// JSON event objects to `hooks.onFrame`, and both take the same commands, so the rest of
// the page never asks which one it has. All URLs are relative to the page (path prefixes).
//
// transport = createTransport('ws' | 'sse', hooks)
//   .kind .label .ready .requested     ('ws'|'sse', shown name, can take a turn, session asked for)
//   .open() .close() .retryNow()
//   .turn(cmd) -> bool                 {type: 'chat'|'edit'|'regenerate', message?, index?, model?, params}
//   .stop(session)                     end the running reply
//   .set(cmd) -> bool                  {type: 'set', model?, params}; false where turns carry them
//   .restore(history, {model, params}) -> bool   seed the session (after a server restart);
//                                      answered with a `session` frame, or an `error` frame
// hooks = {
//   onFrame(frame, transport)          every event from the server (first: a `session` frame)
//   onStatus(status, detail)           'connecting' | 'online' | 'reconnecting' | 'offline'
//   onAuth()                           the server wants a login (HTTP 401)
//   onConnect() -> {session, after}    a (re)connection starts: where to reattach
//   position() -> {session, after}     the same, without starting anything
//   onTurnLost()                       a turn's request failed before any answer (SSE)
// }

import { WsTransport } from './transport-ws.js';
import { SseTransport } from './transport-sse.js';

export function createTransport(kind, hooks) {
  return kind === 'sse' ? new SseTransport(hooks) : new WsTransport(hooks);
}
