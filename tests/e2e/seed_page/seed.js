// The seed page's script. The one line a migrating team changes is WS_URL: it points at the
// NexLM server (the tests pass it as ?server=ws://HOST:PORT/api/ai/chat/websocket).
const WS_URL = new URLSearchParams(location.search).get("server")
  || `ws://${location.host}/api/ai/chat/websocket`;

const reply = document.getElementById("reply");
const state = document.getElementById("state");
let socket = null;

function connect() {
  socket = new WebSocket(WS_URL);
  socket.onopen = () => { state.textContent = "connected"; };
  socket.onmessage = (event) => { reply.textContent += event.data; };
  socket.onclose = () => { state.textContent = "disconnected"; };
  return socket;
}

function send() {
  const frame = {
    modelType: document.getElementById("modelType").value,
    message: document.getElementById("message").value,
  };
  const token = document.getElementById("token").value;
  if (token) frame.token = token;
  reply.textContent = "";
  if (socket && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify(frame));
  } else {
    connect().addEventListener("open", () => socket.send(JSON.stringify(frame)), { once: true });
  }
}

document.getElementById("send").addEventListener("click", send);
connect();
