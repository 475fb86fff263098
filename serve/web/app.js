// The polyrec page: asks /v1/recommend, sends likes, dislikes and ratings to /v1/feedback, adds items
// through /v1/items and shows /v1/model. Plain DOM, no build step; every text from the API goes in as text.
"use strict";

const KEY_STORE = "polyrec.apiKey";
const VISITOR_STORE = "polyrec.visitor";
let ratingChoices = [5, 4, 3, 2, 1]; // the whole ratings on the served model's scale, highest first (showModel)

const $ = (id) => document.getElementById(id);
const dislikedByUser = new Map(); // user id → item ids disliked here, left out of that user's next lists

function element(tag, properties = {}, children = []) {
  const node = Object.assign(document.createElement(tag), properties);
  node.append(...children);
  return node;
}

async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  const key = localStorage.getItem(KEY_STORE);
  if (key) headers["X-API-Key"] = key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = Array.isArray(answer.detail) ? answer.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ") : answer.detail;
    const hint = response.status === 401 ? " Set the API key below." : "";
    throw new Error(`${response.status}: ${detail || response.statusText}.${hint}`);
  }
  return answer;
}

function say(where, message, isError = false) {
  where.textContent = message;
  where.classList.toggle("error", isError);
}

function visitorId() {
  let id = localStorage.getItem(VISITOR_STORE);
  if (!id) {
    id = `visitor-${crypto.getRandomValues(new Uint32Array(1))[0].toString(36)}`;
    localStorage.setItem(VISITOR_STORE, id);
  }
  return id;
}

// --- recommendations ---------------------------------------------------------------------------

let current = null; // {user, request_id} of the list shown

async function recommend(done = "") {
  const user = $("user").value.trim() || visitorId();
  $("user").value = user;
  const interests = $("interests").value.trim();
  const k = Math.min(100, Math.max(1, Number($("k").value) || 10));
  const exclude = [...(dislikedByUser.get(user) || [])];
  const list = $("items");
  list.setAttribute("aria-busy", "true");
  try {
    const answer = await api("/v1/recommend", { method: "POST", body: { user_id: user, k, exclude, ...(interests ? { interests } : {}) } });
    current = { user, requestId: answer.request_id };
    const hadFocus = list.contains(document.activeElement);
    list.replaceChildren(...answer.items.map((item) => itemCard(item, user)));
    if (hadFocus) $("list-heading").focus(); // the focused button went with the old list
    say($("status"), `${done}${answer.items.length} recommendations for ${user}.`);
    const query = new URLSearchParams({ user, ...(interests ? { interests } : {}), ...(k !== 10 ? { k } : {}) });
    history.replaceState(null, "", `?${query}`);
  } catch (error) {
    say($("status"), `Could not get recommendations: ${error.message}`, true);
  } finally {
    list.removeAttribute("aria-busy");
  }
}

function itemCard(item, user) {
  const details = [];
  if (item.year) details.push(String(item.year));
  if (item.genres && item.genres.length) details.push(item.genres.join(", "));
  const figures = element("dl", { className: "figures" }, [
    element("dt", { textContent: "Predicted rating" }),
    element("dd", { textContent: item.rating === null ? "–" : item.rating.toFixed(1) }),
    element("dt", { textContent: "p(like)" }),
    element("dd", { textContent: item.p_like === null ? "–" : item.p_like.toFixed(2) }),
  ]);
  const rating = element("select", { id: `rate-${item.item_id}`, className: "rating" }, ratingChoices.map((r) => element("option", { value: r, textContent: `${r} ★` })));
  const actions = element("div", { className: "actions" }, [
    feedbackButton("Like", "like", item, user),
    feedbackButton("Dislike", "dislike", item, user),
    element("label", { htmlFor: rating.id, className: "visually-hidden", textContent: `Your rating of ${item.title}` }),
    rating,
    feedbackButton("Rate", "rate", item, user, () => Number(rating.value)),
  ]);
  return element("li", { className: "item" }, [
    element("article", {}, [
      element("h3", { textContent: item.title || item.item_id }),
      ...(details.length ? [element("p", { className: "meta", textContent: details.join(" · ") })] : []),
      figures,
      ...(item.because.length ? [element("p", { className: "because", textContent: `Because of ${item.because.map((b) => b.title || b.item_id).join(", ")}` })] : []),
      actions,
    ]),
  ]);
}

function feedbackButton(label, event, item, user, value) {
  const button = element("button", { type: "button", textContent: label });
  button.setAttribute("aria-label", `${label} ${item.title || item.item_id}`);
  button.dataset.event = event;
  button.addEventListener("click", async () => {
    button.disabled = true;
    const body = { user_id: user, item_id: item.item_id, event, request_id: current && current.requestId };
    if (value) body.value = value();
    try {
      await api("/v1/feedback", { method: "POST", body });
      if (event === "dislike") {
        if (!dislikedByUser.has(user)) dislikedByUser.set(user, new Set());
        dislikedByUser.get(user).add(item.item_id);
      }
      const done = { like: "Liked", dislike: "Disliked", rate: `Rated ${body.value} ★:` }[event];
      await recommend(`${done} ${item.title || item.item_id}. `);
    } catch (error) {
      button.disabled = false;
      say($("status"), `Could not record it: ${error.message}`, true);
    }
  });
  return button;
}

// --- items, the model, the key -----------------------------------------------------------------

async function register(event) {
  event.preventDefault();
  const form = event.target;
  const title = form.title.value.trim();
  const body = { item_id: form.item_id.value.trim(), text: form.text.value.trim(), ...(title ? { title } : {}) };
  try {
    const item = await api("/v1/items", { method: "POST", body });
    say($("register-status"), `Added ${item.title || item.item_id} (${item.item_id}): it can be recommended now.`);
    form.reset();
  } catch (error) {
    say($("register-status"), `Could not add it: ${error.message}`, true);
  }
}

async function showModel() {
  try {
    const model = await api("/v1/model");
    $("model-version").textContent = model.model_version;
    ratingChoices = wholeRatings(model.rating_scale) || ratingChoices;
    $("metrics-tables").replaceChildren(metricsTable(model.metrics));
  } catch (error) {
    $("model-version").textContent = "unknown";
    say($("metrics-tables"), `Could not read the model: ${error.message}`, true);
  }
}

// The whole ratings on a scale, highest first; null where a bound is open (a model that records no scale).
function wholeRatings({ low, high }) {
  if (low === null || high === null || Math.floor(high) < Math.ceil(low)) return null;
  return Array.from({ length: Math.floor(high) - Math.ceil(low) + 1 }, (_, i) => Math.floor(high) - i);
}

// One row per figure, one column per split; a split's own prefix, which artifacts from before kept ("validation/NDCG@10"), is dropped.
function metricsTable(metrics) {
  const splits = Object.keys(metrics);
  const bySplit = splits.map((split) => new Map(Object.entries(metrics[split]).map(([name, figure]) => [name.replace(`${split}/`, ""), figure])));
  const names = [...new Set(bySplit.flatMap((figures) => [...figures.keys()]))];
  const shown = (figure) => (figure === undefined ? "–" : Number.isInteger(figure) ? String(figure) : figure.toFixed(4));
  return element("table", {}, [
    element("thead", {}, [element("tr", {}, [element("th", { scope: "col", textContent: "" }), ...splits.map((split) => element("th", { scope: "col", textContent: split }))])]),
    element("tbody", {}, names.map((name) =>
      element("tr", {}, [element("th", { scope: "row", textContent: name }), ...bySplit.map((figures) => element("td", { textContent: shown(figures.get(name)) }))]))),
  ]);
}

function saveKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem(KEY_STORE, key);
  else localStorage.removeItem(KEY_STORE);
  say($("key-status"), key ? "Saved in this browser." : "Removed.");
  showModel();
}

document.addEventListener("DOMContentLoaded", () => {
  $("ask").addEventListener("submit", (event) => {
    event.preventDefault();
    recommend();
  });
  $("register").addEventListener("submit", register);
  $("key-form").addEventListener("submit", saveKey);
  $("api-key").value = localStorage.getItem(KEY_STORE) || "";
  const query = new URLSearchParams(location.search);
  $("user").value = query.get("user") || "";
  $("interests").value = query.get("interests") || "";
  if (query.get("k")) $("k").value = query.get("k");
  // The list after the model: its cards offer the ratings on the model's scale.
  showModel().then(() => {
    if (query.get("user") || query.get("interests")) recommend();
  });
});
