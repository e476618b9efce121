// The chat page: plain JavaScript, no build step, nothing fetched but this server's own API.
// Conversations live in localStorage; replies stream over the OpenAI chat-completions SSE protocol.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "pocketgpt.conversations";
const SETTINGS = ["model", "system", "temperature", "top-p", "max-tokens", "api-key", "json-mode", "json-schema"];
let conversations = JSON.parse(localStorage.getItem(STORE) || "[]");
let current = null; // the open conversation
let controller = null; // aborts the streaming request (Stop)
const contexts = {}; // model id -> its context in tokens (max_model_len)

// ------------------------------------------------------------------ storage and settings

function save() { localStorage.setItem(STORE, JSON.stringify(conversations)); }

function loadSettings() {
  const saved = JSON.parse(localStorage.getItem("pocketgpt.settings") || "{}");
  for (const id of SETTINGS) {
    if (!(id in saved)) continue;
    if ($(id).type === "checkbox") $(id).checked = saved[id]; else $(id).value = saved[id];
  }
  $("json-schema").hidden = !$("json-mode").checked;
}

function saveSettings() {
  const s = {};
  for (const id of SETTINGS) s[id] = $(id).type === "checkbox" ? $(id).checked : $(id).value;
  localStorage.setItem("pocketgpt.settings", JSON.stringify(s));
  $("json-schema").hidden = !$("json-mode").checked;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("api-key").value) h.Authorization = "Bearer " + $("api-key").value;
  return h;
}

// ------------------------------------------------------------------ rendering

function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

// A small markdown subset, on escaped text: fenced code, inline code, bold, italics, line breaks.
function markdown(text) {
  const parts = text.split(/```/);
  return parts.map((part, i) => {
    if (i % 2 === 1) {
      const body = part.replace(/^[\w+-]*\n/, "");
      return "<pre><code>" + escapeHtml(body) + "</code></pre>";
    }
    return escapeHtml(part)
      .replace(/`([^`\n]+)`/g, "<code>$1</code>")
      .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>")
      .replace(/\n/g, "<br>");
  }).join("");
}

function renderList() {
  $("conversations").innerHTML = "";
  conversations.forEach((c, i) => {
    const li = document.createElement("li");
    li.className = c === current ? "active" : "";
    li.innerHTML = `<span>${escapeHtml(c.title || "New chat")}</span><span class="delete" title="delete">×</span>`;
    li.onclick = (e) => {
      if (e.target.classList.contains("delete")) {
        conversations.splice(i, 1);
        if (c === current) current = conversations[0] || null;
        save();
      } else current = c;
      renderList(); renderMessages();
    };
    $("conversations").appendChild(li);
  });
}

function renderMessages() {
  const box = $("messages");
  box.innerHTML = "";
  if (!current) return;
  current.messages.forEach((m, i) => {
    if (m.role === "tool") return; // shown inside the assistant turn that called it
    const div = document.createElement("div");
    div.className = "msg " + m.role;
    div.dataset.index = i;
    let html = markdown(m.content || "");
    for (const call of m.tool_calls || []) {
      html += `<div class="tool">→ ${escapeHtml(call.function.name)}(${escapeHtml(call.function.arguments)})</div>`;
    }
    if (m.error) html += `<div class="error">${escapeHtml(m.error)}</div>`;
    if (m.usage) {  // what the reply cost; the cached part came from the server's prefix cache
      const cached = (m.usage.prompt_tokens_details || {}).cached_tokens || 0;
      html += `<div class="usage">${m.usage.prompt_tokens} prompt tokens (${cached} cached), ${m.usage.completion_tokens} generated</div>`;
    }
    div.innerHTML = `<div class="content">${html}</div>`;
    const actions = document.createElement("div");
    actions.className = "actions";
    if (m.role === "user") actions.appendChild(button("Edit", () => editMessage(i)));
    if (m.role === "assistant" && i === current.messages.length - 1) {
      actions.appendChild(button("Regenerate", regenerate));
      // a reply cut short (by max tokens, or by Stop) goes on from where it is: the server's continue_final_message
      if (m.content && !m.tool_calls && (m.finish_reason === "length" || m.stopped)) actions.appendChild(button("Continue", carryOn));
    }
    div.appendChild(actions);
    box.appendChild(div);
  });
  box.scrollTop = box.scrollHeight;
}

function button(label, onclick) {
  const b = document.createElement("button");
  b.textContent = label;
  b.onclick = onclick;
  return b;
}

// ------------------------------------------------------------------ talking to the API

async function send(text) {
  if (!current) newConversation();
  current.messages.push({ role: "user", content: text });
  if (!current.title) current.title = text.slice(0, 40);
  save(); renderList();
  await complete();
}

// Ask for the next assistant turn, or with `continued` for more of the last one (a reply cut short).
async function complete(continued = false) {
  const messages = [];
  if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value.trim() });
  for (const m of current.messages) {
    if (m.role === "assistant" && m.error && !m.content && !m.tool_calls) continue; // a reply that failed: no turn
    const out = { role: m.role, content: m.content || "" };
    if (m.tool_calls) out.tool_calls = m.tool_calls;
    messages.push(out);
  }
  const body = {
    model: $("model").value, messages, stream: true, stream_options: { include_usage: true },
    temperature: parseFloat($("temperature").value), top_p: parseFloat($("top-p").value),
  };
  if ($("json-mode").checked) {
    try {
      body.response_format = { type: "json_schema", json_schema: { name: "page", schema: JSON.parse($("json-schema").value) } };
    } catch (e) {
      alert("The JSON schema is not valid JSON: " + e.message);
      return;
    }
  }
  if (continued) Object.assign(body, { continue_final_message: true, add_generation_prompt: false });
  const reply = continued ? current.messages.at(-1) : { role: "assistant", content: "" };
  if (!continued) current.messages.push(reply);
  delete reply.finish_reason; delete reply.stopped; delete reply.error;
  renderMessages();
  const contentDiv = $("messages").lastChild.querySelector(".content");
  controller = new AbortController();
  $("send").hidden = true; $("stop").hidden = false;
  try {
    // asked once the message shows and Stop is offered: the page waited on this round trip before showing anything
    body.max_tokens = await replyRoom(body.model, messages, !continued);
    const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!resp.ok) {
      const err = await resp.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || resp.statusText);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        for (const choice of chunk.choices || []) {
          const delta = choice.delta || {};
          if (delta.content) reply.content += delta.content;
          if (delta.tool_calls) reply.tool_calls = delta.tool_calls.map(({ index, ...c }) => c);
          if (choice.finish_reason) reply.finish_reason = choice.finish_reason;
        }
        if (chunk.usage) reply.usage = chunk.usage;
        contentDiv.innerHTML = markdown(reply.content) +
          (reply.tool_calls || []).map((c) => `<div class="tool">→ ${escapeHtml(c.function.name)}(${escapeHtml(c.function.arguments)})</div>`).join("");
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") reply.stopped = true;
    else reply.error = e.message;
  } finally {
    controller = null;
    $("send").hidden = false; $("stop").hidden = true;
    save(); renderMessages();
  }
}

function stop() { if (controller) controller.abort(); }

function carryOn() {
  if (!current || controller) return;
  complete(true);
}

function regenerate() {
  if (!current || controller) return;
  if (current.messages.at(-1).role === "assistant") current.messages.pop();
  complete();
}

function editMessage(i) {
  const text = prompt("Edit the message (the conversation continues from here):", current.messages[i].content);
  if (text === null) return;
  current.messages = current.messages.slice(0, i);
  save();
  send(text);
}

function newConversation() {
  current = { title: "", messages: [] };
  conversations.unshift(current);
  save(); renderList(); renderMessages();
}

// Max tokens is what a reply may take at most: the context left after the prompt caps it (a setting of 256 on a
// 128-token model failed every message). A prompt too long on its own is the server's to say.
async function replyRoom(model, messages, addGenerationPrompt = true) {
  const wanted = parseInt($("max-tokens").value, 10) || 256;
  const context = contexts[model];
  if (!context || !messages.length) return wanted;
  const resp = await fetch("/tokenize", { method: "POST", headers: headers(),
    body: JSON.stringify({ model, messages, add_generation_prompt: addGenerationPrompt }) });
  if (!resp.ok) return wanted;
  const room = context - (await resp.json()).count;
  return room > 0 ? Math.min(wanted, room) : wanted;
}

// ------------------------------------------------------------------ tokenizer view (as Tiktokenizer shows it)

const COLORS = ["#fde2e4", "#e2ece9", "#dfe7fd", "#fff1e6", "#e8e8e4", "#f0efeb", "#cddafd", "#fad2e1"];
let tokTimer = null;

async function tokenizeNow() {
  const resp = await fetch("/tokenize", { method: "POST", headers: headers(), body: JSON.stringify({ model: $("model").value, prompt: $("tok-input").value }) });
  const out = await resp.json();
  if (!resp.ok) { $("tok-count").textContent = out.error ? out.error.message : resp.statusText; return; }
  $("tok-count").textContent = `${out.count} tokens, ${$("tok-input").value.length} characters`;
  $("tok-pieces").innerHTML = out.token_strs.map((s, i) =>
    `<span title="${out.tokens[i]}" class="${out.special[i] ? "special" : ""}" style="background:${COLORS[i % COLORS.length]};color:#111">${escapeHtml(s)}</span>`).join("");
  $("tok-ids").textContent = out.tokens.join(", ");
}

// ------------------------------------------------------------------ arena (Chatbot Arena's blind battle)

let battle = null; // {a, b, prompt, answers: {a, b}} while a vote is open

async function arenaAsk(model, prompt) {
  const messages = [{ role: "user", content: prompt }];
  const body = { model, messages, max_tokens: await replyRoom(model, messages), temperature: Number($("temperature").value) };
  const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const out = await resp.json();
  if (!resp.ok) throw new Error(out.error ? out.error.message : resp.statusText);
  return out.choices[0].message.content || "";
}

async function arenaBattle(e) {
  e.preventDefault();
  const prompt = $("arena-input").value.trim();
  const models = [...$("model").options].map((o) => o.value);
  if (!prompt) return;
  if (models.length < 2) { $("arena-status").textContent = "The arena needs a server with at least two models."; return; }
  const i = Math.floor(Math.random() * models.length);
  let j = Math.floor(Math.random() * (models.length - 1)); if (j >= i) j += 1;
  battle = { a: models[i], b: models[j], prompt, answers: {} };
  for (const side of ["a", "b"]) { $("arena-" + side).textContent = "…"; $("arena-name-" + side).textContent = ""; }
  setVoting(false);
  $("arena-status").textContent = "";
  try {
    const [ta, tb] = await Promise.all([arenaAsk(battle.a, prompt), arenaAsk(battle.b, prompt)]);
    battle.answers = { a: ta, b: tb };
    $("arena-a").innerHTML = markdown(ta); $("arena-b").innerHTML = markdown(tb);
    setVoting(true);
  } catch (err) { $("arena-status").textContent = String(err.message || err); battle = null; }
}

function setVoting(on) { for (const b of document.querySelectorAll("#arena-vote button")) b.disabled = !on; }

async function arenaVote(winner) {
  if (!battle) return;
  const body = { model_a: battle.a, model_b: battle.b, winner, prompt: battle.prompt,
                 length_a: battle.answers.a.length, length_b: battle.answers.b.length };
  const resp = await fetch("/arena/votes", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const out = await resp.json();
  if (!resp.ok) { $("arena-status").textContent = out.error ? out.error.message : resp.statusText; return; }
  $("arena-name-a").textContent = "(" + battle.a + ")"; $("arena-name-b").textContent = "(" + battle.b + ")";
  setVoting(false);
  battle = null;
  $("arena-status").textContent = "Thanks: vote " + out.id + " recorded.";
  arenaBoard();
}

async function arenaBoard() {
  const resp = await fetch("/arena/leaderboard", { headers: headers() });
  const out = await resp.json();
  if (!resp.ok) { $("arena-status").textContent = out.error ? out.error.message : resp.statusText; return; }
  $("arena-board").querySelector("tbody").innerHTML = out.rows.map((r) =>
    `<tr><td>${r.rank}</td><td>${escapeHtml(r.model)}</td><td>${Math.round(r.rating)}</td>` +
    `<td>${Math.round(r.ci_low)} - ${Math.round(r.ci_high)}</td><td>${r.battles}</td></tr>`).join("");
}

// ------------------------------------------------------------------ wiring

async function loadModels() {
  const resp = await fetch("/v1/models", { headers: headers() });
  const models = resp.ok ? (await resp.json()).data : [];
  for (const m of models) contexts[m.id] = m.max_model_len;
  $("status").textContent = resp.status === 401 ? "This server needs an API key: enter it in Settings." :
    resp.ok ? "" : `Cannot list the models: ${resp.status} ${resp.statusText}`;
  const wanted = JSON.parse(localStorage.getItem("pocketgpt.settings") || "{}").model;
  $("model").innerHTML = models.map((m) => `<option>${escapeHtml(m.id)}</option>`).join("");
  if (wanted && models.some((m) => m.id === wanted)) $("model").value = wanted;
  else if (models.length) $("model").value = models[models.length - 1].id; // the most post-trained stage
}

async function init() {
  loadSettings();
  await loadModels();
  $("api-key").addEventListener("change", loadModels);
  current = conversations[0] || null;
  renderList(); renderMessages();
  for (const id of SETTINGS) $(id).addEventListener("change", saveSettings);
  $("composer").onsubmit = (e) => {
    e.preventDefault();
    const text = $("input").value.trim();
    if (!text || controller) return;
    $("input").value = "";
    send(text);
  };
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").onclick = stop;
  $("new-chat").onclick = newConversation;
  for (const b of document.querySelectorAll("#tabs button")) {
    b.onclick = () => {
      for (const other of document.querySelectorAll("#tabs button")) other.classList.toggle("active", other === b);
      $("chat-view").hidden = b.dataset.tab !== "chat";
      $("tokenizer-view").hidden = b.dataset.tab !== "tokenizer";
      $("arena-view").hidden = b.dataset.tab !== "arena";
      if (b.dataset.tab === "tokenizer") tokenizeNow();
      if (b.dataset.tab === "arena") arenaBoard();
    };
  }
  $("tok-input").addEventListener("input", () => { clearTimeout(tokTimer); tokTimer = setTimeout(tokenizeNow, 150); });
  $("arena-form").onsubmit = arenaBattle;
  for (const b of document.querySelectorAll("#arena-vote button")) b.onclick = () => arenaVote(b.dataset.vote);
}

init();
