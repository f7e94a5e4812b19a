// The search page: plain JavaScript over the service's JSON API (no build step, nothing fetched
// from elsewhere). Thumbnails are fetched with the API key when one is set, so the key never goes
// into a URL.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { key: sessionStorage.getItem("retrieval-key") || "", indexes: [], objectUrls: [] };

function headers(extra) {
  const out = Object.assign({}, extra || {});
  if (state.key) out["Authorization"] = "Bearer " + state.key;
  return out;
}

function target() {
  return document.querySelector("input[name=target]:checked").value;
}

function k() {
  const value = parseInt($("k").value, 10);
  return Number.isFinite(value) && value > 0 ? Math.min(value, 1000) : 24;
}

function parts(id) {
  return $(id).value.split(";").map((part) => part.trim()).filter((part) => part.length > 0);
}

// What the option fields add to every search: parts composed with the query, folding, a floor.
function extras() {
  const out = {};
  if (parts("plus").length) out.plus = parts("plus");
  if (parts("minus").length) out.minus = parts("minus");
  const at = parseFloat($("dedup-at").value);
  if ($("dedup").checked && Number.isFinite(at)) out.dedup = at;
  const floor = parseFloat($("confidence").value);
  if (Number.isFinite(floor)) out.min_confidence = floor;
  return out;
}

function percent(fraction) {
  const left = 1 - fraction;
  if (left < 5e-7) return ">99.9999%";
  const digits = Math.min(4, Math.max(0, Math.ceil(Number((-Math.log10(left)).toFixed(6))) - 2));
  const scale = Math.pow(10, digits);
  return (Math.floor(fraction * 100 * scale) / scale).toFixed(digits) + "%";
}

function indexName() {
  return $("index").value || undefined;
}

async function api(path, options) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    throw new Error("the service did not answer (" + e.message + ")");
  }
  let data = null;
  try {
    data = await response.json();
  } catch (e) {
    data = null;
  }
  if (response.status === 401) {
    $("key-choice").hidden = false;
    $("key").focus();
  }
  if (!response.ok) {
    throw new Error((data && data.error) || "the service answered " + response.status);
  }
  return data;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setStatus(message) {
  $("status").textContent = message;
}

function clearResults() {
  for (const url of state.objectUrls) URL.revokeObjectURL(url);
  state.objectUrls = [];
  $("results").replaceChildren();
}

async function loadThumbnail(img, id) {
  const query = new URLSearchParams({ size: "256" });
  if (indexName()) query.set("index", indexName());
  const url = "/v1/images/" + id + "?" + query;
  if (!state.key) {
    img.src = url;
    return;
  }
  try {
    const response = await fetch(url, { headers: headers() });
    if (!response.ok) return;
    const objectUrl = URL.createObjectURL(await response.blob());
    state.objectUrls.push(objectUrl);
    img.src = objectUrl;
  } catch (e) {
    // a missing thumbnail leaves the grey square; the result itself still shows
  }
}

function card(hit, collection) {
  const item = document.createElement("li");
  item.className = "hit " + (collection === "images" ? "image" : "caption");
  item.dataset.id = hit.id;
  if (collection === "images") {
    const img = document.createElement("img");
    img.alt = hit.path;
    img.loading = "lazy";
    loadThumbnail(img, hit.id);
    item.append(img);
  }
  const body = document.createElement("div");
  body.className = "body";
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = "#" + hit.rank + " · " + hit.score.toFixed(3);
  if (hit.confidence !== undefined) {
    score.textContent += " · " + percent(hit.confidence);
    score.title = "the score beats " + percent(hit.confidence) + " of random pairs";
  }
  const folded = (hit.near_duplicates || []).length + (hit.identical || []).length;
  if (folded) {
    const badge = document.createElement("span");
    badge.className = "folded";
    badge.textContent = "+" + folded + " near-duplicate" + (folded > 1 ? "s" : "");
    score.append(" ", badge);
  }
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = collection === "images" ? hit.path.split("/").pop() : hit.text;
  label.title = collection === "images" ? hit.path : (hit.image || "");
  const more = document.createElement("button");
  more.type = "button";
  more.className = "more";
  more.textContent = "More like this";
  more.setAttribute("aria-label", "More like " + label.textContent);
  more.addEventListener("click", () => searchById(hit.id, collection, label.textContent));
  body.append(score, label, more);
  item.append(body);
  return item;
}

function show(data, collection, what, floor) {
  clearResults();
  const hits = data.hits || [];
  if (!hits.length) {
    if (floor !== undefined) {
      setStatus("No good match for " + what + ": no result beats " + percent(floor) + " of random pairs.");
    } else {
      setStatus("No results for " + what + ".");
    }
    return;
  }
  $("results").append(...hits.map((hit) => card(hit, collection)));
  const version = data.version ? " · generation " + data.version.generation : "";
  setStatus(hits.length + " " + collection + " for " + what + " in " + Math.round(data.took_ms) + " ms" + version);
}

async function run(what, collection, call) {
  showError("");
  setStatus("Searching " + what + "…");
  $("go").disabled = true;
  const floor = extras().min_confidence;
  const composed = [...parts("plus").map((p) => " + " + p), ...parts("minus").map((p) => " − " + p)];
  what += composed.join("");
  try {
    show(await call(), collection, what, floor);
  } catch (e) {
    clearResults();
    setStatus("");
    showError(e.message);
  } finally {
    $("go").disabled = false;
  }
}

function searchJson(body) {
  return api("/v1/search", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify(Object.assign({ index: indexName(), target: target(), k: k() }, extras(), body)),
  });
}

function searchText(text) {
  $("query-image").hidden = true;
  if (!text.trim()) {
    showError("Type some words to search for.");
    return;
  }
  run("“" + text + "”", target(), () => searchJson({ text: text }));
}

function searchById(id, collection, label) {
  $("query-image").hidden = true;
  run("more like “" + label + "”", target(), () => searchJson({ id: id, collection: collection }));
}

function searchImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    showError(file.name + " is not an image.");
    return;
  }
  const preview = $("query-image");
  const url = URL.createObjectURL(file);
  preview.querySelector("img").src = url;
  preview.querySelector("span").textContent = file.name;
  preview.hidden = false;
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("target", target());
  form.append("k", String(k()));
  if (indexName()) form.append("index", indexName());
  const more = extras();
  for (const part of more.plus || []) form.append("plus", part);
  for (const part of more.minus || []) form.append("minus", part);
  if (more.dedup !== undefined) form.append("dedup", String(more.dedup));
  if (more.min_confidence !== undefined) form.append("min_confidence", String(more.min_confidence));
  run("the image " + file.name, target(), () =>
    api("/v1/search/image", { method: "POST", headers: headers(), body: form })
  );
}

async function loadIndexes() {
  try {
    const data = await api("/v1/indexes", { headers: headers() });
    state.indexes = data.indexes;
    const select = $("index");
    select.replaceChildren(
      ...data.indexes.map((ix) => new Option(ix.name + " (" + describe(ix) + ")", ix.name))
    );
    $("index-choice").hidden = data.indexes.length < 2;
    showError("");
  } catch (e) {
    showError(e.message);
  }
}

function describe(ix) {
  const parts = [];
  for (const [name, c] of Object.entries(ix.collections || {})) parts.push(c.rows + " " + name);
  return parts.join(", ") || "empty";
}

$("search").addEventListener("submit", (event) => {
  event.preventDefault();
  searchText($("query").value);
});
$("upload").addEventListener("change", (event) => {
  searchImage(event.target.files[0]);
  event.target.value = "";
});
$("key").addEventListener("change", () => {
  state.key = $("key").value;
  sessionStorage.setItem("retrieval-key", state.key);
  loadIndexes();
});
document.addEventListener("keydown", (event) => {
  if (event.key === "/" && document.activeElement !== $("query")) {
    event.preventDefault();
    $("query").focus();
  }
});

let dragDepth = 0;
window.addEventListener("dragenter", (event) => {
  event.preventDefault();
  dragDepth += 1;
  $("drop").hidden = false;
});
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) $("drop").hidden = true;
});
window.addEventListener("drop", (event) => {
  event.preventDefault();
  dragDepth = 0;
  $("drop").hidden = true;
  searchImage(event.dataTransfer.files[0]);
});

loadIndexes();
