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

const STORAGE_FULL = "The browser's storage for this page is full: conversations are not saved. Delete old ones to make room.";

// A full storage (about 5 MB a site) must not stop the page: it says so and goes on unsaved.
function save() {
  try {
    localStorage.setItem(STORE, JSON.stringify(conversations));
    if ($("status").textContent === STORAGE_FULL) $("status").textContent = "";
  } catch (e) {
    $("status").textContent = STORAGE_FULL;
  }
}

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

// A small markdown subset, on escaped text: fenced code, inline code, bold, italics, line breaks. Code is
// shown as written: asterisks in it are not emphasis.
function markdown(text) {
  const parts = text.split(/```/);
  return parts.map((part, i) => {
    if (i % 2 === 1) {
      const body = part.replace(/^[\w+-]*\n/, "");
      return "<pre><code>" + escapeHtml(body) + "</code></pre>";
    }
    return part.split(/(`[^`\n]+`)/).map((piece, j) => j % 2 === 1
      ? "<code>" + escapeHtml(piece.slice(1, -1)) + "</code>"
      : escapeHtml(piece)
        .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
        .replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>")
        .replace(/\n/g, "<br>")).join("");
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
    if (m.left_out) html += `<div class="usage">${m.left_out} earlier messages left out: the model's context holds no more</div>`;
    div.innerHTML = `<div class="content">${html}</div>`;
    const actions = document.createElement("div");
    actions.className = "actions";
    const last = i === current.messages.length - 1;
    if (!controller) {  // while a reply streams, nothing else is asked
      if (m.role === "user") actions.appendChild(button("Edit", () => editMessage(i)));
      // a message left without a reply (a reload mid-reply, a failed request) can still get one
      if (last) actions.appendChild(button("Regenerate", regenerate));
      // a reply cut short (by max tokens, by Stop, by a reload) goes on from where it is: continue_final_message
      if (last && m.role === "assistant" && m.content && !m.tool_calls && (m.finish_reason === "length" || m.stopped || m.partial)) {
        actions.appendChild(button("Continue", carryOn));
      }
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

// What a request asks besides its messages, read from the settings; null (and the user told why) when a setting
// is not usable: checked before anything changes, so a bad schema neither leaves a message unanswered nor
// drops the reply Regenerate was to replace.
function requestSettings() {
  const maxTokens = Number($("max-tokens").value);
  if (!Number.isInteger(maxTokens) || maxTokens < 1) {
    alert("Max tokens must be a whole number of at least 1.");
    return null;
  }
  const settings = { maxTokens };
  if ($("json-mode").checked) {
    try {
      settings.response_format = { type: "json_schema", json_schema: { name: "page", schema: JSON.parse($("json-schema").value) } };
    } catch (e) {
      alert("The JSON schema is not valid JSON: " + e.message);
      return null;
    }
  }
  return settings;
}

async function send(text, settings) {
  if (!current) newConversation();
  current.messages.push({ role: "user", content: text });
  if (!current.title) current.title = text.slice(0, 40);
  save(); renderList();
  await complete(settings);
}

// Ask for the next assistant turn, or with `continued` for more of the last one (a reply cut short).
async function complete(settings, continued = false) {
  const conversation = current;
  let messages = [];
  if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value.trim() });
  for (const m of conversation.messages) {
    // a reply that failed or was stopped before its first token: no turn
    if (m.role === "assistant" && (m.error || m.stopped) && !m.content && !m.tool_calls) continue;
    const out = { role: m.role, content: m.content || "" };
    if (m.tool_calls) out.tool_calls = m.tool_calls;
    messages.push(out);
  }
  const body = {
    model: $("model").value, stream: true, stream_options: { include_usage: true },
    temperature: parseFloat($("temperature").value), top_p: parseFloat($("top-p").value),
  };
  if (settings.response_format) body.response_format = settings.response_format;
  if (continued) Object.assign(body, { continue_final_message: true, add_generation_prompt: false });
  const reply = continued ? conversation.messages.at(-1) : { role: "assistant", content: "" };
  if (!continued) conversation.messages.push(reply);
  delete reply.finish_reason; delete reply.stopped; delete reply.error; delete reply.left_out;
  reply.partial = true; // saved so while it streams: a reload finds it cut short, and may continue it
  controller = new AbortController();
  $("send").hidden = true; $("stop").hidden = false;
  renderMessages();
  // The reply's element, looked up on each chunk: a re-render (another conversation opened and this one again)
  // replaces it, and one kept from the start would no longer be on the page.
  const index = conversation.messages.indexOf(reply);
  const shown = () => current === conversation ? $("messages").querySelector(`.msg[data-index="${index}"] .content`) : null;
  let savedAt = Date.now();
  try {
    // asked once the message shows and Stop is offered: the page waited on this round trip before showing anything
    const fit = await fitToContext(body.model, messages, !continued, settings.maxTokens);
    Object.assign(body, { messages: fit.messages, max_tokens: fit.maxTokens });
    if (fit.leftOut) reply.left_out = fit.leftOut;
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
        const contentDiv = shown();
        if (contentDiv) {
          contentDiv.innerHTML = markdown(reply.content) +
            (reply.tool_calls || []).map((c) => `<div class="tool">→ ${escapeHtml(c.function.name)}(${escapeHtml(c.function.arguments)})</div>`).join("");
          $("messages").scrollTop = $("messages").scrollHeight;
        }
        if (Date.now() - savedAt > 1000) { save(); savedAt = Date.now(); }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") reply.stopped = true;
    else reply.error = e.message;
  } finally {
    delete reply.partial;
    controller = null;
    $("send").hidden = false; $("stop").hidden = true;
    save(); renderList(); renderMessages();
  }
}

function stop() { if (controller) controller.abort(); }

function carryOn() {
  if (!current || controller) return;
  const settings = requestSettings();
  if (settings) complete(settings, true);
}

function regenerate() {
  if (!current || controller) return;
  const settings = requestSettings();
  if (!settings) return;
  if (current.messages.at(-1).role === "assistant") current.messages.pop();
  complete(settings);
}

function editMessage(i) {
  if (controller) return; // one reply at a time: Stop applies to it, and Send comes back when it ends
  const text = prompt("Edit the message (the conversation continues from here):", current.messages[i].content);
  if (text === null) return;
  const settings = requestSettings();
  if (!settings) return;
  current.messages = current.messages.slice(0, i);
  save();
  send(text, settings);
}

function newConversation() {
  current = { title: "", messages: [] };
  conversations.unshift(current);
  save(); renderList(); renderMessages();
}

// The prompt's tokens, by the server's /tokenize; null if it cannot say.
async function promptTokens(model, messages, addGenerationPrompt) {
  const resp = await fetch("/tokenize", { method: "POST", headers: headers(),
    body: JSON.stringify({ model, messages, add_generation_prompt: addGenerationPrompt }) });
  return resp.ok ? (await resp.json()).count : null;
}

// The messages a model's context holds, and the reply's room. Max tokens is what a reply may take at most: the
// context left after the prompt caps it (a setting of 256 on a 128-token model failed every message). When the
// prompt leaves less than MIN_ROOM tokens (or what Max tokens asks, if less), the oldest exchanges are left out,
// never the system prompt or the last exchange, as a chat that goes on must: on a 128-token model every message
// failed from the fourth on. A last exchange too long on its own is the server's to refuse.
const MIN_ROOM = 32;

async function fitToContext(model, messages, addGenerationPrompt, wanted) {
  const context = contexts[model];
  let leftOut = 0;
  for (;;) {
    const count = context && messages.length ? await promptTokens(model, messages, addGenerationPrompt) : null;
    if (count === null) return { messages, maxTokens: wanted, leftOut };
    const room = context - count;
    const first = messages.findIndex((m) => m.role !== "system");
    const next = messages.findIndex((m, i) => i > first && m.role === "user");
    if (room >= Math.min(wanted, MIN_ROOM) || first < 0 || next < 0) {
      return { messages, maxTokens: room > 0 ? Math.min(wanted, room) : wanted, leftOut };
    }
    leftOut += next - first;
    messages = [...messages.slice(0, first), ...messages.slice(next)];
  }
}

// ------------------------------------------------------------------ tokenizer view (as Tiktokenizer shows it)

const COLORS = ["#fde2e4", "#e2ece9", "#dfe7fd", "#fff1e6", "#e8e8e4", "#f0efeb", "#cddafd", "#fad2e1"];
let tokTimer = null;

async function tokenizeNow() {
  const resp = await fetch("/tokenize", { method: "POST", headers: headers(), body: JSON.stringify({ model: $("model").value, prompt: $("tok-input").value, add_special_tokens: false }) });
  const out = await resp.json();
  if (!resp.ok) {  // the last text's tokens would pass for this one's
    $("tok-count").textContent = out.error ? out.error.message : resp.statusText;
    $("tok-pieces").innerHTML = ""; $("tok-ids").textContent = "";
    return;
  }
  // characters as a person counts them (code points): "🙂".length is 2 in JavaScript
  $("tok-count").textContent = `${out.count} tokens, ${[...$("tok-input").value].length} characters`;
  $("tok-pieces").innerHTML = out.token_strs.map((s, i) =>
    `<span title="${out.tokens[i]}" class="${out.special[i] ? "special" : ""}" style="background:${COLORS[i % COLORS.length]};color:#111">${escapeHtml(s)}</span>`).join("");
  $("tok-ids").textContent = out.tokens.join(", ");
}

// ------------------------------------------------------------------ arena (Chatbot Arena's blind battle)

let battle = null; // {a, b, prompt, answers: {a, b}} while a vote is open

async function arenaAsk(model, prompt, maxTokens) {
  const messages = [{ role: "user", content: prompt }];
  const fit = await fitToContext(model, messages, true, maxTokens);
  const body = { model, messages, max_tokens: fit.maxTokens, temperature: Number($("temperature").value) };
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
  const settings = requestSettings();
  if (!settings) return;
  const i = Math.floor(Math.random() * models.length);
  let j = Math.floor(Math.random() * (models.length - 1)); if (j >= i) j += 1;
  const mine = { a: models[i], b: models[j], prompt, answers: {} };
  battle = mine;
  for (const side of ["a", "b"]) { $("arena-" + side).textContent = "…"; $("arena-name-" + side).textContent = ""; }
  setVoting(false);
  $("arena-go").disabled = true; // one battle at a time: a vote names one battle's models, prompt and answers
  $("arena-status").textContent = "";
  try {
    const [ta, tb] = await Promise.all([arenaAsk(mine.a, prompt, settings.maxTokens), arenaAsk(mine.b, prompt, settings.maxTokens)]);
    if (battle !== mine) return;
    mine.answers = { a: ta, b: tb };
    $("arena-a").innerHTML = markdown(ta); $("arena-b").innerHTML = markdown(tb);
    setVoting(true);
  } catch (err) {
    if (battle === mine) { $("arena-status").textContent = String(err.message || err); battle = null; }
  } finally {
    $("arena-go").disabled = false;
  }
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
  $("arena-note").textContent = out.unsettled ? "Not ratings yet: " + out.unsettled + "." : "";
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
    const settings = requestSettings();
    if (!settings) return; // the text stays in the box
    $("input").value = "";
    send(text, settings);
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
