"use strict";
// The StructXLIP static explorer. Every string from the data (captions, errors, paths) enters the page through
// textContent or an attribute setter, never as HTML: captions are untrusted input.
(function () {
  const DATA = JSON.parse(document.getElementById("report-data").textContent);
  const ROWS = DATA.rows;
  const PAGE_SIZE = DATA.page_size || 24;
  const QUERY_PAGE_SIZE = DATA.query_page_size || 10;
  const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324",
                  "#469990", "#800000"];
  const SVG_NS = "http://www.w3.org/2000/svg";
  const SECTIONS = ["browse", "quality", "training", "retrieval"];
  const ROW_OF_ID = new Map(ROWS.map((row, index) => [row.i, index]));

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "class") node.className = value;
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svgEl(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    return node;
  }

  function lazyImg(src, alt, cls) {
    if (!src) return el("div", {class: "no-image", text: "no " + alt});
    const img = el("img", {loading: "lazy", decoding: "async", alt: alt, class: cls});
    img.src = src;
    return img;
  }

  function fmt(value, digits) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    if (typeof value !== "number") return String(value);
    if (Number.isInteger(value)) return String(value);
    if (value !== 0 && Math.abs(value) < 0.01) return value.toExponential(2);
    return value.toFixed(digits === undefined ? 2 : digits);
  }

  // ---- state in the URL hash, so a page or filter can be linked and reloaded --------------------------------
  function readState() {
    return new URLSearchParams(location.hash.replace(/^#/, ""));
  }

  function writeState(changes) {
    const state = readState();
    for (const [key, value] of Object.entries(changes)) {
      if (value === "" || value === null || value === undefined) state.delete(key);
      else state.set(key, String(value));
    }
    const hash = state.toString();
    history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search);
    render();
  }

  // ---- manifest browser -----------------------------------------------------------------------------------
  const FILTER_KEYS = ["status", "split", "regions", "smin", "smax", "q", "sort"];
  const SEARCH_TEXT = ROWS.map((row) => [row.i, row.src || "", row.c || "", row.e || ""].join("\n").toLowerCase());

  function filteredRows(state) {
    const status = state.get("status") || "";
    const split = state.get("split") || "";
    const regions = state.get("regions") || "";
    const smin = state.get("smin") === null || state.get("smin") === "" ? null : Number(state.get("smin"));
    const smax = state.get("smax") === null || state.get("smax") === "" ? null : Number(state.get("smax"));
    const terms = (state.get("q") || "").toLowerCase().split(/\s+/).filter(Boolean);
    const matches = [];
    for (let index = 0; index < ROWS.length; index++) {
      const row = ROWS[index];
      if (status && row.st !== status) continue;
      if (split && row.sp !== split) continue;
      const count = row.seg ? row.seg.length : 0;
      if (regions === "with" && !count) continue;
      if (regions === "without" && count) continue;
      if ((smin !== null || smax !== null) && (row.best === null || row.best === undefined)) continue;
      if (smin !== null && row.best < smin) continue;
      if (smax !== null && row.best > smax) continue;
      if (terms.length && !terms.every((term) => SEARCH_TEXT[index].includes(term))) continue;
      matches.push(index);
    }
    const sort = state.get("sort") || "";
    if (sort) {
      const sign = sort === "score-asc" ? 1 : -1;
      const key = (i) => (ROWS[i].best === null || ROWS[i].best === undefined ? Infinity : sign * ROWS[i].best);
      matches.sort((a, b) => key(a) - key(b) || a - b);
    }
    return matches;
  }

  function pager(container, page, pages, total, noun, onPage) {
    container.replaceChildren(
      el("button", {type: "button", class: "prev", disabled: page <= 1}, "‹ previous"),
      el("span", {class: "page-label", text: `page ${page} of ${pages} · ${total} ${noun}`}),
      el("button", {type: "button", class: "next", disabled: page >= pages}, "next ›"),
    );
    container.querySelector(".prev").addEventListener("click", () => onPage(page - 1));
    container.querySelector(".next").addEventListener("click", () => onPage(page + 1));
  }

  function markedCaption(text, spans, cls) {
    const p = el("p", {class: cls});
    let at = 0;
    for (const [start, end] of spans || []) {
      if (start > at) p.append(document.createTextNode(text.slice(at, start)));
      p.append(el("del", {class: "removed-word", title: "removed by the filter", text: text.slice(start, end)}));
      at = end;
    }
    p.append(document.createTextNode(text.slice(at)));
    return p;
  }

  function negativeItem(caption, edit) {
    const [prefix, suffix, middle] = edit;
    return el("li", {},
      caption.slice(0, prefix),
      el("mark", {class: "swap", text: middle || "∅"}),
      caption.slice(caption.length - suffix));
  }

  function overlayFigure(row) {
    const wrap = el("div", {class: "overlay"});
    if (row.w && row.h) wrap.style.aspectRatio = `${row.w} / ${row.h}`;
    wrap.append(lazyImg(row.img, "image", "photo"));
    if (row.w && row.h && row.seg && row.seg.length) {
      const svg = svgEl("svg", {viewBox: `0 0 ${row.w} ${row.h}`, preserveAspectRatio: "none", class: "regions-overlay"});
      const fontSize = Math.max(row.w, row.h) / 14;
      row.seg.forEach((seg, n) => {
        const [x1, y1, x2, y2] = seg;
        const color = COLORS[n % COLORS.length];
        const rect = svgEl("rect", {class: "region-box", x: x1, y: y1, width: x2 - x1, height: y2 - y1, stroke: color,
                                    "data-region": n + 1});
        const title = svgEl("title");
        title.textContent = `region ${n + 1}: score ${fmt(seg[7])}`;
        rect.append(title);
        const label = svgEl("text", {class: "region-label", x: x1 + fontSize * 0.2, y: y1 + fontSize, fill: color,
                                     "font-size": fontSize});
        label.textContent = String(n + 1);
        svg.append(rect, label);
      });
      wrap.append(svg);
    }
    return el("figure", {}, wrap, el("figcaption", {text: row.seg && row.seg.length
      ? `image with ${row.seg.length} region box${row.seg.length > 1 ? "es" : ""}` : "image (no regions)"}));
  }

  function card(index) {
    const row = ROWS[index];
    const head = el("div", {class: "card-head"},
      el("span", {class: "rownum", text: `#${index + 1}`}),
      el("span", {class: `badge status-${row.st === "ok" ? "ok" : "failed"}`, text: row.st}),
      row.sp ? el("span", {class: "badge", text: row.sp}) : null,
      row.w ? el("span", {text: `${row.w}×${row.h}`}) : null,
      el("span", {class: "src", title: row.src || "", text: (row.src || "").split(/[\\/]/).pop()}),
      el("code", {text: row.i}),
      row.best !== null && row.best !== undefined ? el("span", {text: `best score ${fmt(row.best)}`}) : null);
    const article = el("article", {class: "card", "data-row": index, "data-image-id": row.i}, head);
    if (row.e) article.append(el("div", {class: "error", text: row.e}));
    article.append(el("div", {class: "visuals"},
      overlayFigure(row),
      el("figure", {}, lazyImg(row.map, "structure map", "map"), el("figcaption", {text: "structure map"})),
      el("figure", {}, lazyImg(row.scr, "scribble", "map"), el("figcaption", {text: "scribble"}))));
    if (row.c) {
      const captions = el("div", {class: "captions"},
        el("h4", {text: row.rm && row.rm.length ? `Caption (${row.rm.length} word${row.rm.length > 1 ? "s" : ""} removed by the filter)` : "Caption"}),
        markedCaption(row.c, row.rm, "caption-raw"));
      if (row.fc !== null && row.fc !== undefined) {
        captions.append(el("h4", {text: "Filtered caption"}),
                        el("p", {class: "caption-filtered", text: row.fc === 1 ? row.c : row.fc}));
      }
      article.append(captions);
    }
    if (row.seg && row.seg.length) {
      const list = el("div", {class: "regions"});
      row.seg.forEach((seg, n) => {
        const [, , , , crop, structureCrop, sentence, score] = seg;
        const item = el("div", {class: "region", "data-region": n + 1},
          lazyImg(crop, "crop"), lazyImg(structureCrop, "structure crop"),
          el("div", {class: "region-text"},
            el("span", {class: "score", text: `${n + 1} · score ${fmt(score)}`}),
            el("p", {class: "region-sentence", text: sentence || "(no sentence)"})));
        item.style.borderLeftColor = COLORS[n % COLORS.length];
        list.append(item);
      });
      article.append(el("h4", {text: `Regions (${row.seg.length})`}), list);
    }
    if (row.neg && row.neg.length && row.c) {
      const list = el("ol");
      for (const edit of row.neg) list.append(negativeItem(row.c, edit));
      article.append(el("details", {class: "negatives"},
        el("summary", {text: `Hard negatives (${row.neg.length}), changed words marked`}), list));
    }
    return article;
  }

  function syncForm(state) {
    const form = document.getElementById("filters");
    for (const key of FILTER_KEYS) {
      const field = form.elements[key];
      if (field && document.activeElement !== field) field.value = state.get(key) || "";
    }
  }

  function renderBrowse(state) {
    syncForm(state);
    const matches = filteredRows(state);
    const pages = Math.max(1, Math.ceil(matches.length / PAGE_SIZE));
    const page = Math.min(Math.max(1, parseInt(state.get("page") || "1", 10) || 1), pages);
    const onPage = (p) => { writeState({page: p}); window.scrollTo(0, 0); };
    for (const id of ["browse-pager-top", "browse-pager-bottom"]) {
      pager(document.getElementById(id), page, pages, matches.length, "images", onPage);
    }
    const cards = document.getElementById("cards");
    cards.replaceChildren(...matches.slice((page - 1) * PAGE_SIZE, page * PAGE_SIZE).map(card));
    if (!matches.length) cards.append(el("p", {class: "note", text: "No image matches these filters."}));
  }

  function setupFilters() {
    const form = document.getElementById("filters");
    const splits = [...new Set(ROWS.map((row) => row.sp).filter(Boolean))].sort();
    for (const split of splits) form.elements.split.append(el("option", {value: split, text: split}));
    let timer = null;
    const apply = () => {
      const changes = {page: ""};
      for (const key of FILTER_KEYS) changes[key] = form.elements[key].value.trim();
      writeState(changes);
    };
    form.addEventListener("change", apply);
    form.addEventListener("input", (event) => {
      if (event.target.name === "q") { clearTimeout(timer); timer = setTimeout(apply, 200); }
    });
    form.addEventListener("submit", (event) => { event.preventDefault(); apply(); });
    document.getElementById("reset-filters").addEventListener("click", () => {
      const changes = {page: ""};
      for (const key of FILTER_KEYS) changes[key] = "";
      writeState(changes);
    });
  }

  // ---- quality report ------------------------------------------------------------------------------------
  function table(headers, rows, numeric) {
    const t = el("table", {}, el("tr", {}, ...headers.map((h) => el("th", {text: h}))));
    for (const row of rows) {
      t.append(el("tr", {}, ...row.map((cell, i) => el("td", {class: numeric && numeric[i] ? "num" : null,
                                                               text: fmt(cell)}))));
    }
    return t;
  }

  function summaryRows(entries) {
    return entries.map(([name, s]) => [name, s.count, s.min, s.mean, s.median, s.max]);
  }

  function renderQuality() {
    const q = DATA.quality;
    const body = document.getElementById("quality-body");
    if (!q) { body.append(el("p", {class: "note", text: "No quality report."})); return; }
    const c = q.counts;
    body.append(table(["rows", "ok", "failed", "with regions", "without regions",
                       ...Object.keys(c.by_split).map((s) => `split ${s}`)],
                      [[c.rows, c.ok, c.failed, c.with_regions, c.without_regions, ...Object.values(c.by_split)]],
                      Array(20).fill(true)));
    body.append(el("h4", {text: "Distributions"}),
      table(["quantity", "count", "min", "mean", "median", "max"], summaryRows([
        ["caption length, raw (words)", q.caption_length.raw],
        ["caption length, filtered (words)", q.caption_length.filtered],
        ["regions per image", q.regions_per_image.summary],
        ["similarity_score (100·cos)", q.similarity_score.summary],
        ["image width (px)", q.image_size.width], ["image height (px)", q.image_size.height],
        [`edge density (${q.edge_density.measured} maps read)`, q.edge_density.summary]]),
        [false, true, true, true, true, true]),
      el("p", {class: "note", text: q.similarity_score.scale}));
    const grid = el("div", {class: "grid"});
    for (const [name, uri] of Object.entries(DATA.plots || {})) {
      const img = el("img", {alt: name, class: `plot plot-${name}`});
      img.src = uri;
      grid.append(img);
    }
    body.append(grid);
    const removed = q.removed_words;
    body.append(el("h4", {text: `Words removed by the filter: ${removed.total} in ${removed.captions_changed} captions ` +
                                `(${removed.captions_unchanged} unchanged)`}));
    const categories = Object.entries(removed.by_category || {});
    if (categories.length) {
      body.append(table(["category", "top removed words"],
        categories.map(([category, words]) => [category, words.map(([w, n]) => `${w} (${n})`).join(", ")])));
    }
    body.append(el("h4", {text: "Image sizes (most common)"}),
                table(["width×height", "images"], q.image_size.common, [false, true]));
    body.append(el("h4", {text: `Failures: ${q.failures.count}`}));
    if (q.failures.count) {
      body.append(table(["stage", "images"], Object.entries(q.failures.by_stage), [false, true]),
                  table(["reason", "images"], q.failures.reasons, [false, true]));
    }
  }

  // ---- training -------------------------------------------------------------------------------------------
  function metricGroups(metrics) {
    // "t2i/R@1" -> group "" / direction t2i; "zero_shot/t2i/R@1" -> group "zero_shot".
    const groups = new Map();
    for (const [key, value] of Object.entries(metrics || {})) {
      const parts = key.split("/");
      if (parts.length < 2 || typeof value !== "number") continue;
      const metric = parts.pop();
      const direction = parts.pop();
      const group = parts.join("/");
      if (!groups.has(group)) groups.set(group, new Map());
      const rows = groups.get(group);
      if (!rows.has(direction)) rows.set(direction, {});
      rows.get(direction)[metric] = value;
    }
    return groups;
  }

  function renderTraining() {
    const body = document.getElementById("training-body");
    if (DATA.training && DATA.training.plot) {
      const img = el("img", {alt: "training curves", class: "plot plot-training"});
      img.src = DATA.training.plot;
      body.append(el("div", {class: "grid"}, img));
      const last = DATA.training.last || {};
      body.append(table(["steps", "epochs", "final loss", "final lr", "skipped steps"],
        [[last.step, DATA.training.epochs, last.loss, last.lr, last.skipped_steps]], Array(5).fill(true)));
    } else {
      body.append(el("p", {class: "note", text: "No training metrics (OUT/train/metrics.jsonl)."}));
    }
  }

  // ---- retrieval ------------------------------------------------------------------------------------------
  function renderMetrics(body) {
    const metrics = DATA.eval;
    if (!metrics) { body.append(el("p", {class: "note", text: "No evaluation metrics (OUT/eval/metrics.json)."})); return; }
    const columns = ["R@1", "R@5", "R@10", "R@25", "R@50", "mean_rank", "median_rank"];
    const rows = [];
    for (const [group, directions] of metricGroups(metrics)) {
      for (const [direction, values] of directions) {
        rows.push([group || "fine-tuned", direction, ...columns.map((c) => values[c])]);
      }
    }
    const pairs = metrics.n_pairs !== undefined ? ` on ${metrics.n_pairs} pairs` : "";
    body.append(el("h4", {text: `Recall${pairs}`}),
                table(["model", "direction", ...columns], rows, [false, false, ...columns.map(() => true)]));
  }

  function renderRetrieval(state) {
    const body = document.getElementById("retrieval-body");
    body.replaceChildren();
    renderMetrics(body);
    const rankings = DATA.rankings;
    if (!rankings || !rankings.models || !Object.keys(rankings.models).length) {
      body.append(el("p", {class: "note", text: "No per-query rankings (OUT/eval/rankings.json): run " +
                                                 "`structxlip rankings OUT` to list each query's top images."}));
      return;
    }
    const models = Object.keys(rankings.models);
    const by = models.includes(state.get("rby")) ? state.get("rby") : models[models.length - 1];
    const ids = rankings.image_ids;
    const order = ids.map((_, i) => i);
    const ranks = rankings.models[by].ranks;
    order.sort((a, b) => ranks[b] - ranks[a] || a - b);
    const select = el("select", {name: "rby"});
    for (const name of models) select.append(el("option", {value: name, text: name, selected: name === by}));
    select.addEventListener("change", () => writeState({rby: select.value, rpage: ""}));
    body.append(el("h4", {text: `Text → image: each caption's top ${rankings.top_k} images on split ${rankings.split}`}),
                el("p", {class: "note"}, "Worst queries first by the rank of their own image under ", select,
                   ". A green frame is the query's own image (a hit)."));
    const pages = Math.max(1, Math.ceil(order.length / QUERY_PAGE_SIZE));
    const page = Math.min(Math.max(1, parseInt(state.get("rpage") || "1", 10) || 1), pages);
    const top = el("div", {class: "pager"});
    const list = el("div", {id: "queries"});
    body.append(top, list);
    pager(top, page, pages, order.length, "queries", (p) => { writeState({rpage: p}); });
    for (const q of order.slice((page - 1) * QUERY_PAGE_SIZE, page * QUERY_PAGE_SIZE)) {
      const own = ROW_OF_ID.get(ids[q]);
      const text = own === undefined ? ids[q] : ROWS[own].c;
      const item = el("div", {class: "query", "data-query": q},
        el("div", {class: "query-head"},
           el("figure", {class: "own", title: ids[q]}, lazyImg(own === undefined ? null : ROWS[own].img, "image"),
              el("figcaption", {text: "its image"})),
           el("p", {class: "query-text", text: text})));
      for (const name of models) {
        const entry = rankings.models[name];
        const strip = el("div", {class: "topk"});
        entry.top[q].forEach((gallery, k) => {
          const hit = gallery === q;
          const row = ROW_OF_ID.get(ids[gallery]);
          const fig = el("figure", {class: hit ? "hit" : "miss", title: ids[gallery]},
            lazyImg(row === undefined ? null : ROWS[row].img, "image"),
            el("figcaption", {}, hit ? el("span", {class: "hit-mark", text: "✓ "}) : null,
               `${k + 1} · ${fmt(entry.scores[q][k], 3)}`));
          strip.append(fig);
        });
        const rank = entry.ranks[q];
        item.append(el("div", {class: "model-row", "data-model": name},
          el("span", {class: "model-name", text: name},
             el("span", {class: "rank", text: `own image at rank ${rank}${rank <= rankings.top_k ? "" : " (not shown)"}`})),
          strip));
      }
      list.append(item);
    }
  }

  function render() {
    const started = performance.now();
    const state = readState();
    // One section shown at a time (#view=quality links to one); all are rendered, hidden ones included.
    const view = SECTIONS.includes(state.get("view")) ? state.get("view") : SECTIONS[0];
    for (const id of SECTIONS) document.getElementById(id).hidden = id !== view;
    for (const button of document.querySelectorAll("[data-goto]")) {
      button.classList.toggle("active", button.dataset.goto === view);
    }
    renderBrowse(state);
    renderRetrieval(state);
    // Measured, not asserted: how long one filter/page change takes (milliseconds).
    document.body.setAttribute("data-render-ms", (performance.now() - started).toFixed(1));
  }

  for (const button of document.querySelectorAll("[data-goto]")) {
    button.addEventListener("click", () => { writeState({view: button.dataset.goto}); window.scrollTo(0, 0); });
  }
  setupFilters();
  renderQuality();
  renderTraining();
  render();
  window.addEventListener("hashchange", render);
  document.body.setAttribute("data-ready-ms", performance.now().toFixed(0));
  document.body.setAttribute("data-rendered", "1");
})();
