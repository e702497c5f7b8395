// The search page of ./run.sh serve: queries /api/search, renders the results.
// Every string from the index (keys, sources, tags) is written with textContent, never as HTML.
// The URL holds the query (?tag=, ?key=, &filter=), so every result page is a deep link; a photo
// query is not (its bytes stay in the page).
"use strict";

(function () {
  const K = Number(document.body.dataset.k) || 36;
  const $ = (id) => document.getElementById(id);
  const tagInput = $("tag");
  const keyInput = $("key");
  const list = $("suggestions");
  const status = $("status");
  const results = $("results");
  const filtersBox = $("filters");
  const facetsBox = $("facets");
  const activeBox = $("active-filters");
  const drop = $("drop");
  const photoInput = $("photo");
  const preview = $("photo-preview");

  let current = null; // {tag} | {key} | {photo: File}, and filters
  let filters = []; // [{wnid, label}]
  let requestNumber = 0;
  let previewUrl = null;

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  // WordNet lemmas join words with underscores: shown with spaces.
  function words(text) {
    return String(text).replace(/_/g, " ");
  }

  function setState(state) {
    document.body.dataset.state = state;
  }

  // ------------------------------------------------------------------------------ URL state

  function fromUrl() {
    const params = new URLSearchParams(window.location.search);
    filters = params.getAll("filter").map((wnid) => ({ wnid: wnid, label: wnid }));
    if (params.get("tag")) return { tag: params.get("tag") };
    if (params.get("key")) return { key: params.get("key") };
    return null;
  }

  function toUrl(query) {
    const params = new URLSearchParams();
    if (query && query.tag) params.set("tag", query.tag);
    if (query && query.key) params.set("key", query.key);
    if (query && !query.photo) filters.forEach((f) => params.append("filter", f.wnid));
    const search = params.toString();
    return search ? "/?" + search : "/";
  }

  // -------------------------------------------------------------------------------- queries

  async function run(query, push) {
    current = query;
    const number = ++requestNumber;
    if (push) {
      const url = toUrl(query);
      if (url !== window.location.pathname + window.location.search) {
        window.history.pushState(null, "", url);
      }
    }
    tagInput.value = query.tag || "";
    keyInput.value = query.key || "";
    if (!query.photo) showPreview(null);
    setState("loading");
    status.replaceChildren(el("p", "muted", "Searching…"));
    const params = new URLSearchParams({ k: String(K) });
    filters.forEach((f) => params.append("filter", f.wnid));
    let response;
    try {
      if (query.photo) {
        const form = new FormData();
        form.append("image", query.photo, query.photo.name || "photo");
        response = await fetch("/api/search?" + params, { method: "POST", body: form });
      } else {
        params.set(query.tag ? "tag" : "key", query.tag || query.key);
        response = await fetch("/api/search?" + params);
      }
    } catch (error) {
      if (number === requestNumber) showError("The server cannot be reached (" + error.message + ").");
      return;
    }
    let answer;
    try {
      answer = await response.json();
    } catch (error) {
      answer = { error: "the server answered " + response.status + " with no JSON" };
    }
    if (number !== requestNumber) return; // a newer query was started meanwhile
    if (response.ok) render(query, answer);
    else if (response.status === 404 && query.tag) showUnknownTag(query.tag, answer);
    else showError(answer.error || "error " + response.status);
  }

  // ------------------------------------------------------------------------------ rendering

  function describe(query, answer) {
    const count = answer.results.length;
    const line = el("p", "summary");
    line.append(el("strong", null, count + (count === 1 ? " image" : " images")));
    if (query.tag) {
      line.append(" tagged ");
      line.append(el("span", "term", query.tag));
      const synsets = answer.synsets || [];
      if (synsets.length) {
        line.append(" (" + synsets.map((s) => s.label + " · " + s.wnid).join("; ") + ")");
      }
    } else if (query.key) {
      line.append(" most like ");
      line.append(el("span", "term", query.key));
    } else {
      line.append(" most like the photo");
    }
    if (filters.length) line.append(", within " + filters.map((f) => f.label).join(" + "));
    const timing = el("span", "timing", answer.took_ms.toFixed(1) + " ms");
    if (answer.embed_ms !== undefined) timing.title = "of which the model: " + answer.embed_ms.toFixed(1) + " ms";
    line.append(timing);
    return line;
  }

  function render(query, answer) {
    if (answer.filters) filters = answer.filters;
    const parts = [describe(query, answer)];
    if (answer.note) parts.push(el("p", "note", answer.note));
    if (!answer.results.length) {
      parts.push(el("p", "message", query.tag
        ? "No indexed image carries this tag" + (filters.length ? " within these categories." : ".")
        : "No images match" + (filters.length ? " within these categories." : ".")));
    }
    status.replaceChildren(...parts);
    renderFilters(answer.categories || []);
    results.replaceChildren(...answer.results.map((hit, i) => card(hit, i)));
    setState(answer.results.length ? "results" : "empty");
    performance.mark("results-rendered");
  }

  // A long key or path shows its end (the file name), cut at the start, whole in its title.
  function ellipsed(className, text) {
    const box = el("div", className);
    box.title = text;
    box.append(el("bdi", null, text));
    return box;
  }

  function card(hit, i) {
    const link = el("a", "card");
    link.href = "/?key=" + encodeURIComponent(hit.key);
    link.title = "More like " + hit.key;
    link.dataset.key = hit.key;
    const frame = el("div", "thumb");
    const img = el("img");
    img.alt = hit.key;
    img.decoding = "async";
    if (i >= 12) img.loading = "lazy";
    img.width = 256;
    img.height = 256;
    img.addEventListener("error", () => frame.classList.add("missing"), { once: true });
    if (hit.thumbnail) img.src = hit.thumbnail;
    frame.append(img);
    const score = el("span", "score", hit.score.toFixed(3));
    score.title = hit.wnid ? "category score of " + hit.wnid : "cosine similarity";
    frame.append(score);
    link.append(frame);
    const body = el("div", "body");
    body.append(ellipsed("key", hit.key));
    if (hit.source && hit.source !== hit.key) body.append(ellipsed("source", hit.source));
    const tags = el("div", "tags");
    (hit.tags || []).forEach((tag) => tags.append(el("span", "tag", words(tag))));
    body.append(tags);
    link.append(body);
    link.addEventListener("click", (event) => {
      if (event.metaKey || event.ctrlKey || event.shiftKey || event.button !== 0) return;
      event.preventDefault();
      filters = [];
      run({ key: hit.key }, true);
      window.scrollTo({ top: 0 });
    });
    return link;
  }

  function renderFilters(categories) {
    activeBox.replaceChildren(...filters.map((f) => {
      const chip = el("button", "chip active", words(f.label));
      chip.type = "button";
      chip.title = "Remove the filter " + f.wnid;
      chip.append(el("span", "x", "×"));
      chip.addEventListener("click", () => {
        filters = filters.filter((g) => g.wnid !== f.wnid);
        rerun();
      });
      return chip;
    }));
    facetsBox.replaceChildren(...categories.map((c) => {
      const chip = el("button", "chip", words(c.label));
      chip.type = "button";
      chip.title = c.wnid + ": in " + c.count + " of these results";
      chip.append(el("span", "count", c.count));
      chip.addEventListener("click", () => {
        filters.push({ wnid: c.wnid, label: c.label });
        rerun();
      });
      return chip;
    }));
    filtersBox.hidden = !filters.length && !categories.length;
  }

  function rerun() {
    if (current) run(current, !current.photo);
  }

  function showUnknownTag(tag, answer) {
    const parts = [el("p", "message", answer.error || "Unknown tag.")];
    const near = answer.suggestions || [];
    if (near.length) {
      const line = el("p", "did-you-mean", "Did you mean ");
      near.forEach((term, i) => {
        const button = el("button", "link", term);
        button.type = "button";
        button.addEventListener("click", () => {
          filters = [];
          run({ tag: term }, true);
        });
        if (i) line.append(", ");
        line.append(button);
      });
      line.append("?");
      parts.push(line);
    }
    status.replaceChildren(...parts);
    results.replaceChildren();
    renderFilters([]);
    setState("unknown");
  }

  function showError(message) {
    status.replaceChildren(el("p", "message error", message));
    results.replaceChildren();
    renderFilters([]);
    setState("error");
  }

  function showPreview(file) {
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = file ? URL.createObjectURL(file) : null;
    preview.hidden = !file;
    drop.classList.toggle("has-photo", Boolean(file));
    if (file) preview.src = previewUrl;
    else preview.removeAttribute("src");
  }

  // ---------------------------------------------------------------------------- suggestions

  let suggestTimer = null;
  let suggestNumber = 0;
  let active = -1;

  function closeSuggestions() {
    list.hidden = true;
    list.replaceChildren();
    tagInput.setAttribute("aria-expanded", "false");
    active = -1;
  }

  async function suggest() {
    const text = tagInput.value.trim();
    const number = ++suggestNumber;
    if (!text) return closeSuggestions();
    let found = [];
    try {
      const response = await fetch("/api/suggest?q=" + encodeURIComponent(text));
      found = (await response.json()).suggestions || [];
    } catch (error) {
      return;
    }
    if (number !== suggestNumber || document.activeElement !== tagInput) return;
    if (!found.length) return closeSuggestions();
    list.replaceChildren(...found.map((s, i) => {
      const item = el("li", "suggestion");
      item.id = "suggestion-" + i;
      item.setAttribute("role", "option");
      item.dataset.value = s.value;
      item.append(el("span", "term", s.term.replace(/_/g, " ")));
      if (s.name && s.name.toLowerCase() !== s.term.replace(/_/g, " ").toLowerCase()) {
        item.append(el("span", "label", s.name));
      }
      item.append(el("span", "wnid", s.wnid));
      if (s.images !== null && s.images !== undefined) item.append(el("span", "count", s.images));
      item.addEventListener("mousedown", (event) => {
        event.preventDefault();
        choose(s.value);
      });
      return item;
    }));
    list.hidden = false;
    tagInput.setAttribute("aria-expanded", "true");
    active = -1;
  }

  function choose(value) {
    closeSuggestions();
    filters = [];
    run({ tag: value }, true);
  }

  function highlight(index) {
    const items = list.children;
    if (!items.length) return;
    active = (index + items.length) % items.length;
    Array.from(items).forEach((item, i) => item.setAttribute("aria-selected", String(i === active)));
    tagInput.setAttribute("aria-activedescendant", items[active].id);
  }

  tagInput.addEventListener("input", () => {
    clearTimeout(suggestTimer);
    suggestTimer = setTimeout(suggest, 90);
  });
  tagInput.addEventListener("keydown", (event) => {
    if (list.hidden) return;
    if (event.key === "ArrowDown") highlight(active + 1);
    else if (event.key === "ArrowUp") highlight(active - 1);
    else if (event.key === "Escape") closeSuggestions();
    else if (event.key === "Enter" && active >= 0) choose(list.children[active].dataset.value);
    else return;
    event.preventDefault();
  });
  tagInput.addEventListener("blur", () => setTimeout(closeSuggestions, 100));

  // ---------------------------------------------------------------------------------- forms

  $("tag-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const tag = tagInput.value.trim();
    closeSuggestions();
    if (tag) {
      filters = [];
      run({ tag: tag }, true);
    }
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = keyInput.value.trim();
    if (key) {
      filters = [];
      run({ key: key }, true);
    }
  });

  function searchPhoto(file) {
    if (!file) return;
    filters = [];
    showPreview(file);
    window.history.pushState(null, "", "/");
    run({ photo: file }, false);
  }

  photoInput.addEventListener("change", () => searchPhoto(photoInput.files[0]));
  ["dragenter", "dragover"].forEach((name) => drop.addEventListener(name, (event) => {
    event.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((name) => drop.addEventListener(name, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer && event.dataTransfer.files[0];
    searchPhoto(file);
  });
  window.addEventListener("popstate", () => {
    const query = fromUrl();
    if (query) run(query, false);
  });

  const initial = fromUrl();
  if (initial) run(initial, false);
  else setState("ready");
})();
