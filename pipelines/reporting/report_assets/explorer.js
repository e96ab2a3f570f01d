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
  const SECTIONS = ["browse", "quality", "training", "retrieval", "map", "compare"];
  const ROW_OF_ID = new Map(ROWS.map((row, index) => [row.i, index]));
  const COMPARE = DATA.compare || [];
  const HIST = DATA.hist || {};
  const HIST_NAMES = Object.keys(HIST);
  const RANK_MODELS = ["fine-tuned", "zero-shot"];
  // Each row's bin per histogram (-1: not counted, e.g. a failed image), computed once: a filter change only counts.
  const BIN = {};
  for (const name of HIST_NAMES) {
    const {edges, values} = HIST[name];
    const bins = new Int16Array(ROWS.length).fill(-1);
    const last = edges.length - 2;
    for (let index = 0; index < ROWS.length; index++) {
      const v = values[index];
      if (v === null || v === undefined || last < 0) continue;
      let bin = -1;
      for (let b = 0; b <= last; b++) {
        if (v >= edges[b] && (v < edges[b + 1] || (b === last && v <= edges[b + 1]))) { bin = b; break; }
      }
      bins[index] = bin;
    }
    BIN[name] = bins;
  }
  const PICKED = new Set();  // hand-picked row indices (the export takes them, else the filtered rows)

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
  const FILTER_KEYS = ["status", "split", "regions", "smin", "smax", "q", "sort", "changed"];
  // With compared runs: whether another run found different regions (boxes) or a different best score.
  function differs(row, other) {
    const boxes = (r) => JSON.stringify((r.seg || []).map((s) => s.slice(0, 4)));
    return other.best !== row.best || boxes(other) !== boxes(row);
  }
  const CHANGED = ROWS.map((row) => COMPARE.some((run) => run.rows[row.i] !== undefined &&
                                                          differs(row, run.rows[row.i])));
  const BIN_KEYS = HIST_NAMES.map((name) => "bin_" + name);
  const SEARCH_TEXT = ROWS.map((row) => [row.i, row.src || "", row.c || "", row.e || ""].join("\n").toLowerCase());

  function filteredRows(state) {
    const status = state.get("status") || "";
    const split = state.get("split") || "";
    const regions = state.get("regions") || "";
    const smin = state.get("smin") === null || state.get("smin") === "" ? null : Number(state.get("smin"));
    const smax = state.get("smax") === null || state.get("smax") === "" ? null : Number(state.get("smax"));
    const terms = (state.get("q") || "").toLowerCase().split(/\s+/).filter(Boolean);
    const changed = state.get("changed") || "";
    const bins = [];
    for (const name of HIST_NAMES) {
      const value = state.get("bin_" + name);
      if (value !== null && value !== "") bins.push([BIN[name], parseInt(value, 10)]);
    }
    const matches = [];
    for (let index = 0; index < ROWS.length; index++) {
      const row = ROWS[index];
      if (status && row.st !== status) continue;
      if (split && row.sp !== split) continue;
      const count = row.seg ? row.seg.length : 0;
      // Both count ok images only, as the quality report does: a failed image has no regions to find.
      if (regions === "with" && (row.st !== "ok" || !count)) continue;
      if (regions === "without" && (row.st !== "ok" || count)) continue;
      if (changed && CHANGED[index] !== (changed === "yes")) continue;
      let inBins = true;
      for (const [rowBins, bin] of bins) if (rowBins[index] !== bin) { inBins = false; break; }
      if (!inBins) continue;
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

  function rankText(ranks) {
    const parts = RANK_MODELS.map((name, slot) => (ranks && ranks[slot] ? `${name} ${ranks[slot]}` : null))
      .filter(Boolean);
    return parts.length ? `t2i rank: ${parts.join(" · ")}` : "";
  }

  function visuals(row, image) {
    // ``row``: the run's maps and regions; ``image``: this run's row, whose thumbnail and size are the image's.
    const shown = Object.assign({}, row, {img: image.img, w: image.w, h: image.h});
    return el("div", {class: "visuals"},
      overlayFigure(shown),
      el("figure", {}, lazyImg(row.map, "structure map", "map"), el("figcaption", {text: "structure map"})),
      el("figure", {}, lazyImg(row.scr, "scribble", "map"), el("figcaption", {text: "scribble"})));
  }

  function runColumn(label, image, row, k) {
    const column = el("div", {class: "run", "data-run": k + 1}, el("h4", {text: label}));
    if (!row) { column.append(el("p", {class: "note", text: "not in this run"})); return column; }
    const ranks = k < 0 ? image.rk : (COMPARE[k].ranks || {})[image.i];
    const count = row.seg ? row.seg.length : 0;
    column.append(visuals(row, image), el("p", {class: "run-stats", text:
      `${row.st} · ${count} region${count === 1 ? "" : "s"} · best score ${fmt(row.best)}` +
      (ranks ? ` · ${rankText(ranks)}` : "")}));
    if (k >= 0 && row.fc !== undefined && row.fc !== 1 && row.fc !== (image.fc === 1 ? image.c : image.fc)) {
      column.append(el("p", {class: "run-stats", text: `filtered caption: ${row.fc}`}));
    }
    return column;
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
      row.best !== null && row.best !== undefined ? el("span", {text: `best score ${fmt(row.best)}`}) : null,
      row.rk ? el("span", {class: "ranks", text: rankText(row.rk)}) : null);
    const pick = el("input", {type: "checkbox", class: "pick-box", "aria-label": `pick image ${row.i} for export`,
                              checked: PICKED.has(index)});
    pick.addEventListener("change", () => {
      if (pick.checked) PICKED.add(index); else PICKED.delete(index);
      pick.closest(".card").classList.toggle("picked", pick.checked);
      renderSelection(filteredRows(readState()));
    });
    head.append(el("label", {class: "pick"}, pick, " pick"));
    const article = el("article", {class: `card${PICKED.has(index) ? " picked" : ""}`, "data-row": index,
                                   "data-image-id": row.i}, head);
    if (row.e) article.append(el("div", {class: "error", text: row.e}));
    if (COMPARE.length) {
      article.append(el("div", {class: "runs"}, runColumn(DATA.run.label + " (this run)", row, row, -1),
                        ...COMPARE.map((run, k) => runColumn(run.label, row, run.rows[row.i], k))));
    } else {
      article.append(visuals(row, row));
    }
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

  function binLabel(name, bin) {
    const {edges, integer} = HIST[name];
    const low = edges[bin], high = edges[bin + 1];
    if (integer) return high - low === 1 ? String(low) : `${low}–${high - 1}`;
    return `${fmt(low)} to ${fmt(high)}`;
  }

  // The histograms are drawn once; a filter change only moves each bar's "shown" part and marks the selected bar,
  // so a focused bar keeps the keyboard focus and a change costs a count, not a redraw.
  const HIST_VIEW = {};
  const HIST_W = 300, HIST_H = 110, HIST_BOTTOM = 16, HIST_LEFT = 4;

  function barHeight(n, top) {
    return n ? Math.max(1.5, (HIST_H - HIST_BOTTOM - 14) * n / top) : 0;  // 14: room for the count label
  }

  function setupHistograms() {
    const container = document.getElementById("histograms");
    for (const name of HIST_NAMES) {
      const {edges, label} = HIST[name];
      const bins = BIN[name];
      const count = Math.max(0, edges.length - 1);
      const all = new Array(count).fill(0);
      for (let index = 0; index < bins.length; index++) if (bins[index] >= 0) all[bins[index]]++;
      const top = Math.max(1, ...all);
      const barWidth = count ? (HIST_W - 2 * HIST_LEFT) / count : 0;
      const svg = svgEl("svg", {viewBox: `0 0 ${HIST_W} ${HIST_H}`, role: "group", "aria-label": label});
      const bars = [];
      for (let bin = 0; bin < count; bin++) {
        const x = HIST_LEFT + bin * barWidth;
        const group = svgEl("g", {class: "bar", role: "button", tabindex: 0, "data-hist": name, "data-bin": bin,
                                  "data-count": all[bin]});
        const title = svgEl("title");
        const shown = svgEl("rect", {class: "shown", x: x + 0.5, width: Math.max(1, barWidth - 1)});
        const allHeight = Math.max(barHeight(all[bin], top), 2);
        group.append(title,
          // A full-height transparent target: a short bar is as easy to click as a tall one.
          svgEl("rect", {class: "hit", x: x, y: 0, width: barWidth, height: HIST_H - HIST_BOTTOM, fill: "transparent"}),
          svgEl("rect", {class: "all", x: x + 0.5, y: HIST_H - HIST_BOTTOM - allHeight,
                         width: Math.max(1, barWidth - 1), height: allHeight}),
          shown);
        const toggle = () => {
          const selected = readState().get("bin_" + name);
          writeState({["bin_" + name]: selected !== null && Number(selected) === bin ? "" : bin, page: ""});
        };
        group.addEventListener("click", toggle);
        group.addEventListener("keydown", (event) => {
          if (event.key === "Enter" || event.key === " ") { event.preventDefault(); toggle(); }
        });
        svg.append(group);
        bars.push({group, title, shown});
      }
      if (count) {
        const axisLow = svgEl("text", {class: "axis", x: HIST_LEFT, y: HIST_H - 4});
        axisLow.textContent = fmt(edges[0]);
        const axisHigh = svgEl("text", {class: "axis", x: HIST_W - HIST_LEFT, y: HIST_H - 4, "text-anchor": "end"});
        axisHigh.textContent = fmt(HIST[name].integer ? edges[count] - 1 : edges[count]);
        const axisTop = svgEl("text", {class: "axis", x: HIST_LEFT + 2, y: 9});
        axisTop.textContent = `${top} images`;
        svg.append(axisLow, axisHigh, axisTop);
      }
      const clear = el("button", {type: "button", class: "clear-bin", hidden: true,
                                  "aria-label": `clear the ${label} filter`});
      clear.addEventListener("click", () => writeState({["bin_" + name]: "", page: ""}));
      const caption = el("figcaption", {}, el("strong", {text: label}), clear);
      container.append(el("figure", {class: `histogram hist-${name}`, "data-hist": name}, caption,
                          count ? svg : el("p", {class: "note", text: "no data"})));
      HIST_VIEW[name] = {bars, all, top, clear, label};
    }
  }

  function renderHistograms(state, matches) {
    for (const name of HIST_NAMES) {
      const view = HIST_VIEW[name];
      const bins = BIN[name];
      const shown = new Array(view.bars.length).fill(0);
      for (const index of matches) if (bins[index] >= 0) shown[bins[index]]++;
      const value = state.get("bin_" + name);
      const selected = value === null || value === "" ? -1 : Number(value);
      view.bars.forEach((bar, bin) => {
        const height = barHeight(shown[bin], view.top);
        bar.shown.setAttribute("y", HIST_H - HIST_BOTTOM - height);
        bar.shown.setAttribute("height", height);
        bar.group.classList.toggle("selected", bin === selected);
        bar.group.setAttribute("aria-pressed", bin === selected ? "true" : "false");
        bar.group.setAttribute("data-shown", shown[bin]);
        const range = `${view.label} ${binLabel(name, bin)}: ${shown[bin]} of ${view.all[bin]} images shown`;
        const action = bin === selected ? "press to clear this filter" : "press to filter to them";
        bar.group.setAttribute("aria-label", `${range}; ${action}`);
        bar.title.textContent = `${view.label} ${binLabel(name, bin)}: ${view.all[bin]} images ` +
                                `(${shown[bin]} in the current filter)`;
      });
      view.clear.hidden = selected < 0 || selected >= view.bars.length;
      if (!view.clear.hidden) view.clear.textContent = `${binLabel(name, selected)} ×`;
    }
  }

  function exportScope(matches) {
    return PICKED.size ? {kind: "picked", rows: [...PICKED].sort((a, b) => a - b)} : {kind: "filtered", rows: matches};
  }

  function selectionText(matches) {
    return exportScope(matches).rows.map((index) => ROWS[index].i).join("\n") + "\n";
  }

  function shellQuote(text) {
    return /^[\w@%+=:,./-]+$/.test(text) ? text : "'" + text.replace(/'/g, "'\\''") + "'";
  }

  function renderSelection(matches) {
    const scope = exportScope(matches);
    document.getElementById("selection-count").textContent = PICKED.size
      ? `${PICKED.size} picked by hand` : `${matches.length} filtered (pick images to export only those)`;
    const button = document.getElementById("export-ids");
    button.textContent = `export ${scope.rows.length} ${scope.kind} image ids (.txt)`;
    button.disabled = !scope.rows.length;
    const out = shellQuote(DATA.run.path);
    document.getElementById("export-help").replaceChildren(
      "then ", el("code", {text: `structxlip select ${out} --ids selection.txt --parquet selection.parquet`}),
      " (add --json selection.json for the reference format, --split train to train on all of it) and ",
      el("code", {text: "structxlip train selection.parquet --out RUN"}));
  }

  function setupSelection() {
    document.getElementById("pick-filtered").addEventListener("click", () => {
      for (const index of filteredRows(readState())) PICKED.add(index);
      render();
    });
    document.getElementById("clear-picks").addEventListener("click", () => { PICKED.clear(); render(); });
    document.getElementById("export-ids").addEventListener("click", () => {
      const text = selectionText(filteredRows(readState()));
      const link = el("a", {download: "selection.txt"});
      link.href = URL.createObjectURL(new Blob([text], {type: "text/plain"}));
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 10000);
    });
  }

  function renderBrowse(state) {
    syncForm(state);
    const matches = filteredRows(state);
    renderHistograms(state, matches);
    renderSelection(matches);
    const pages = Math.max(1, Math.ceil(matches.length / PAGE_SIZE));
    const page = Math.min(Math.max(1, parseInt(state.get("page") || "1", 10) || 1), pages);
    const onPage = (p) => { writeState({page: p}); window.scrollTo(0, 0); };
    for (const id of ["browse-pager-top", "browse-pager-bottom"]) {
      pager(document.getElementById(id), page, pages, matches.length, "images", onPage);
    }
    const cards = document.getElementById("cards");
    cards.replaceChildren(...matches.slice((page - 1) * PAGE_SIZE, page * PAGE_SIZE).map(card));
    if (!matches.length) cards.append(el("p", {class: "note", text: "No image matches these filters."}));
    return matches;
  }

  function setupFilters() {
    const form = document.getElementById("filters");
    const splits = [...new Set(ROWS.map((row) => row.sp).filter(Boolean))].sort();
    for (const split of splits) form.elements.split.append(el("option", {value: split, text: split}));
    if (COMPARE.length) {
      const select = el("select", {name: "changed"}, el("option", {value: "", text: "any"}),
        el("option", {value: "yes", text: "changed in another run"}),
        el("option", {value: "no", text: "same in every run"}));
      form.insertBefore(el("label", {title: "region boxes or best score differ between the compared runs"},
                           "runs ", select), document.getElementById("reset-filters"));
    }
    let timer = null;
    const apply = () => {
      const changes = {page: ""};
      for (const key of FILTER_KEYS) changes[key] = form.elements[key] ? form.elements[key].value.trim() : "";
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
    body.append(table(["rows", "ok", "failed", "ok, with regions", "ok, without regions",
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
    // eval/metrics.json: "t2i/R@1" at the top level is the fine-tuned model; "zero_shot": {"t2i/R@1": ...} the
    // base model before fine-tuning. Returns Map(model -> Map(direction -> {metric: value})).
    const groups = new Map();
    const add = (model, source) => {
      for (const [key, value] of Object.entries(source || {})) {
        const cut = key.indexOf("/");
        if (cut < 0 || typeof value !== "number") continue;
        if (!groups.has(model)) groups.set(model, new Map());
        const rows = groups.get(model);
        const direction = key.slice(0, cut);
        if (!rows.has(direction)) rows.set(direction, {});
        rows.get(direction)[key.slice(cut + 1)] = value;
      }
    };
    add("zero-shot", metrics && metrics.zero_shot);
    add("fine-tuned", metrics);
    const order = ["t2i", "i2t", "s2t", "t2s", "ts2i"];
    const rank = (d) => (order.includes(d) ? order.indexOf(d) : order.length);
    for (const [model, rows] of groups) {
      groups.set(model, new Map([...rows].sort((a, b) => rank(a[0]) - rank(b[0]) || (a[0] < b[0] ? -1 : 1))));
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
    const groups = metricGroups(metrics);
    const directions = [...new Set([...groups.values()].flatMap((rows) => [...rows.keys()]))];
    const rows = [];
    for (const direction of directions) {  // zero-shot above fine-tuned for each direction
      for (const [model, byDirection] of groups) {
        if (!byDirection.has(direction)) continue;
        rows.push([model, direction, ...columns.map((c) => byDirection.get(direction)[c])]);
      }
    }
    const pairs = metrics.n_pairs !== undefined ? ` on ${metrics.n_pairs} pairs` : "";
    body.append(el("h4", {text: `Recall${pairs}`}),
                table(["model", "direction", ...columns], rows, [false, false, ...columns.map(() => true)]));
    if (DATA.recall_plot) {
      const img = el("img", {alt: "Recall@1 per direction, zero-shot and fine-tuned", class: "plot plot-recall"});
      img.src = DATA.recall_plot;
      body.append(el("div", {class: "grid"}, img));
    }
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
    const fallback = models.includes("fine-tuned") ? "fine-tuned" : models[models.length - 1];
    const by = models.includes(state.get("rby")) ? state.get("rby") : fallback;
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

  // ---- embedding map --------------------------------------------------------------------------------------
  // The map's data is parsed the first time the map is shown: at 10,000 images it is ~1 MB that a page opened to
  // browse never needs.
  let EMB = null;
  const MAP_W = 720, MAP_H = 520, MAP_PAD = 14;
  const SPLIT_COLORS = {train: "#4363d8", val: "#3cb44b", test: "#f58231"};
  const map = {canvas: null, tip: null, live: null, focus: -1, points: [], model: "", kind: "image", color: "split",
               scoreLow: Infinity, scoreHigh: -Infinity};
  for (const row of ROWS) {
    if (row.best === null || row.best === undefined) continue;
    map.scoreLow = Math.min(map.scoreLow, row.best); map.scoreHigh = Math.max(map.scoreHigh, row.best);
  }

  function scoreColor(value, low, high) {
    if (value === null || value === undefined) return "#bbb";
    const t = high > low ? Math.min(1, Math.max(0, (value - low) / (high - low))) : 0.5;
    return `hsl(${Math.round(240 - 240 * t)}, 75%, 45%)`;  // blue (low) to red (high)
  }

  function pointColor(row) {
    if (!row) return "#999";
    if (map.color === "status") return row.st === "ok" ? "#1b7f3b" : "#b3261e";
    if (map.color === "score") return scoreColor(row.best, map.scoreLow, map.scoreHigh);
    return SPLIT_COLORS[row.sp] || "#911eb4";
  }

  function mapModelSlot() {
    return Math.max(0, RANK_MODELS.indexOf(map.model));
  }

  function drawMap(matchSet) {
    const canvas = map.canvas;
    const ratio = window.devicePixelRatio || 1;
    if (canvas.width !== MAP_W * ratio) { canvas.width = MAP_W * ratio; canvas.height = MAP_H * ratio; }
    const context = canvas.getContext("2d");
    context.setTransform(ratio, 0, 0, ratio, 0, 0);
    context.clearRect(0, 0, MAP_W, MAP_H);
    const coords = (EMB.points[map.model] || {})[map.kind] || [];
    const slot = mapModelSlot();
    map.points = [];
    // Filtered-out points first (faint), so the current filter's points are drawn on top.
    const order = [];
    coords.forEach(([px, py], j) => {
      const index = EMB.rows[j];
      const x = MAP_PAD + px * (MAP_W - 2 * MAP_PAD), y = MAP_PAD + (1 - py) * (MAP_H - 2 * MAP_PAD);
      const shown = index !== undefined && matchSet.has(index);
      map.points.push({j, index, x, y, shown});
      order.push(j);
    });
    order.sort((a, b) => map.points[a].shown - map.points[b].shown);
    const radius = coords.length > 2000 ? 2.5 : 4;
    for (const j of order) {
      const point = map.points[j];
      const row = point.index === undefined ? null : ROWS[point.index];
      context.globalAlpha = point.shown ? 0.9 : 0.15;
      context.fillStyle = pointColor(row);
      context.beginPath();
      context.arc(point.x, point.y, radius, 0, 2 * Math.PI);
      context.fill();
      const rank = row && row.rk ? row.rk[slot] : null;
      if (map.failures && rank && rank > 1) {  // a retrieval failure: its caption does not find it first
        context.strokeStyle = "#b3261e";
        context.lineWidth = 1;
        context.beginPath();
        context.arc(point.x, point.y, radius + 2.5, 0, 2 * Math.PI);
        context.stroke();
      }
    }
    context.globalAlpha = 1;
    if (map.focus >= 0 && map.points[map.focus]) {
      const point = map.points[map.focus];
      context.strokeStyle = "#000";
      context.lineWidth = 2;
      context.strokeRect(point.x - 8, point.y - 8, 16, 16);
    }
    canvas.setAttribute("data-points", map.points.length);
  }

  function nearestPoint(x, y, radius) {
    let best = -1, bestDistance = radius * radius;
    for (const point of map.points) {
      const distance = (point.x - x) ** 2 + (point.y - y) ** 2;
      if (distance <= bestDistance && (best < 0 || point.shown || !map.points[best].shown)) {
        best = point.j; bestDistance = distance;
      }
    }
    return best;
  }

  function describePoint(j) {
    const point = map.points[j];
    const row = point && point.index !== undefined ? ROWS[point.index] : null;
    const rank = row.rk ? row.rk[mapModelSlot()] : null;
    return `point ${j + 1} of ${map.points.length}: ${row.sp || "no split"}, best score ${fmt(row.best)}` +
           (rank ? `, t2i rank ${rank}` : "") + `. ${row.c || row.i}`;
  }

  function showTip(j) {
    const point = map.points[j];
    if (!point || point.index === undefined) { map.tip.hidden = true; return; }
    const row = ROWS[point.index];
    const rank = row.rk ? row.rk[mapModelSlot()] : null;
    map.tip.replaceChildren(lazyImg(row.img, "image"),
      el("div", {text: `${row.sp || ""} · score ${fmt(row.best)}${rank ? ` · rank ${rank}` : ""}`}),
      el("div", {text: (row.c || row.i).slice(0, 140)}));
    map.tip.style.left = `${Math.min(point.x + 12, MAP_W - 190)}px`;
    map.tip.style.top = `${Math.min(point.y + 12, MAP_H - 120)}px`;
    map.tip.hidden = false;
  }

  function openCard(j) {
    const point = map.points[j];
    if (point && point.index !== undefined) writeState({card: ROWS[point.index].i});
  }

  function setupMap() {
    const body = document.getElementById("map-body");
    map.ready = true;
    EMB = JSON.parse(document.getElementById("map-data").textContent);
    if (!EMB) {
      body.append(el("p", {class: "note", text: "No embeddings (OUT/eval/embeddings.npz): the evaluate stage writes " +
                                                 "them; run the pipeline's evaluate stage again."}));
      return;
    }
    const kinds = Object.keys(EMB.points[EMB.models[0]]);
    const modelSelect = el("select", {name: "mmodel"});
    for (const model of EMB.models) modelSelect.append(el("option", {value: model, text: model}));
    modelSelect.addEventListener("change", () => writeState({mmodel: modelSelect.value}));
    const kindSelect = el("select", {name: "mkind"});
    const kindNames = {image: "images", structure: "structure maps", text: "captions"};
    for (const kind of kinds) kindSelect.append(el("option", {value: kind, text: kindNames[kind] || kind}));
    const colorSelect = el("select", {name: "mcolor"});
    for (const [value, text] of [["split", "split"], ["status", "status"], ["score", "best region score"]]) {
      colorSelect.append(el("option", {value, text}));
    }
    const failures = el("input", {type: "checkbox", name: "mfail", checked: true});
    failures.addEventListener("change", () => writeState({mfail: failures.checked ? "" : "0"}));
    kindSelect.addEventListener("change", () => writeState({mkind: kindSelect.value}));
    colorSelect.addEventListener("change", () => writeState({mcolor: colorSelect.value}));
    map.canvas = el("canvas", {tabindex: 0, role: "application", "aria-roledescription": "scatter plot",
                               id: "embedding-canvas", "aria-describedby": "map-focus",
                               "aria-label": "embedding map: arrow keys move between points, Enter opens the image"});
    map.canvas.style.width = `${MAP_W}px`; map.canvas.style.height = `${MAP_H}px`;
    map.tip = el("div", {class: "map-tip", hidden: true});
    map.live = el("p", {class: "note", "aria-live": "polite", id: "map-focus"});
    map.legend = el("div", {class: "legend"});
    body.append(
      el("p", {class: "note", text: `${EMB.rows.length} images of split ${EMB.split || "?"}: the image, ` +
        "structure-map or " +
        `caption embeddings of a model, each projected to 2-D (${EMB.method.toUpperCase()}), ` +
        "from eval/embeddings.npz. Points outside the browser's filter are faint; a red ring marks a retrieval " +
        "failure (its caption ranks another image first). Hover for the image, click to open its card."}),
      el("div", {class: "map-controls"}, el("label", {}, "model ", modelSelect), el("label", {}, "show ", kindSelect),
         el("label", {}, "colour by ", colorSelect),
         el("label", {}, failures, " ring retrieval failures (t2i rank > 1)"), map.legend),
      el("div", {class: "map-wrap"}, map.canvas, map.tip), map.live);
    const local = (event) => {
      const box = map.canvas.getBoundingClientRect();
      return [event.clientX - box.left, event.clientY - box.top];
    };
    map.canvas.addEventListener("mousemove", (event) => {
      const j = nearestPoint(...local(event), 8);
      if (j >= 0) showTip(j); else map.tip.hidden = true;
    });
    map.canvas.addEventListener("mouseleave", () => { map.tip.hidden = true; });
    map.canvas.addEventListener("click", (event) => {
      const j = nearestPoint(...local(event), 8);
      if (j >= 0) openCard(j);
    });
    map.canvas.addEventListener("keydown", (event) => {
      const shown = map.points.filter((p) => p.shown).map((p) => p.j);
      const list = shown.length ? shown : map.points.map((p) => p.j);
      if (!list.length) return;
      const at = list.indexOf(map.focus);
      if (["ArrowRight", "ArrowDown", "ArrowLeft", "ArrowUp"].includes(event.key)) {
        event.preventDefault();
        const step = event.key === "ArrowRight" || event.key === "ArrowDown" ? 1 : -1;
        map.focus = list[(at + step + list.length) % list.length];
        drawMap(new Set(filteredRows(readState())));
        map.live.textContent = describePoint(map.focus);
        showTip(map.focus);
      } else if (event.key === "Enter" && map.focus >= 0) {
        event.preventDefault();
        openCard(map.focus);
      }
    });
  }

  function renderMap(state, matches) {
    if (!map.ready) setupMap();
    if (!EMB || !map.canvas) return;
    map.model = EMB.models.includes(state.get("mmodel")) ? state.get("mmodel") : EMB.models[0];
    const kinds = Object.keys(EMB.points[map.model]);
    map.kind = kinds.includes(state.get("mkind")) ? state.get("mkind") : kinds[0];
    document.querySelector("select[name=mmodel]").value = map.model;
    map.color = ["split", "status", "score"].includes(state.get("mcolor")) ? state.get("mcolor") : "split";
    map.failures = state.get("mfail") !== "0";
    document.querySelector("input[name=mfail]").checked = map.failures;
    document.querySelector("select[name=mkind]").value = map.kind;
    document.querySelector("select[name=mcolor]").value = map.color;
    drawMap(new Set(matches));
    if (map.color === "split") {
      map.legend.replaceChildren(...Object.entries(SPLIT_COLORS).map(([name, color]) => {
        const dot = el("i"); dot.style.background = color; return el("span", {}, dot, name);
      }));
    } else if (map.color === "status") {
      map.legend.replaceChildren(...[["ok", "#1b7f3b"], ["failed", "#b3261e"]].map(([name, color]) => {
        const dot = el("i"); dot.style.background = color; return el("span", {}, dot, name);
      }));
    } else {
      map.legend.replaceChildren(el("span", {text: `blue ${fmt(map.scoreLow)} → red ${fmt(map.scoreHigh)}`}));
    }
  }

  // ---- compared runs ----------------------------------------------------------------------------------------
  function renderCompare() {
    const body = document.getElementById("compare-body");
    if (!COMPARE.length) return;
    document.getElementById("goto-compare").hidden = false;
    const columns = ["R@1", "R@5", "R@10", "mean_rank", "median_rank"];
    const here = metricGroups(DATA.eval || {});
    COMPARE.forEach((run, k) => {
      const block = el("div", {class: "compare-run", "data-run": k + 1});
      block.append(el("h3", {text: `${DATA.run.label} (this run) vs ${run.label}`}),
                   el("p", {class: "note", text: `${DATA.run.path} vs ${run.path}`}));
      block.append(el("h4", {text: "Config keys that differ"}));
      if (run.config && run.config.length) {
        block.append(table(["key", DATA.run.label, run.label], run.config.map(([key, a, b]) =>
          [key, ...[a, b].map((v) => (v === null || v === undefined ? "–" : JSON.stringify(v)))])));
      } else {
        block.append(el("p", {class: "note", text: "none found (config.yaml missing or identical)"}));
      }
      let changed = 0, shared = 0;
      for (const row of ROWS) {
        const other = run.rows[row.i];
        if (!other) continue;
        shared++;
        if (differs(row, other)) changed++;
      }
      block.append(el("p", {text: `${shared} images in both runs, ${changed} with different region boxes or best ` +
                                  `score (browse them with the "runs" filter); ${ROWS.length - shared} only in this ` +
                                  `run, ${run.only_there} only in ${run.label}.`}));
      const there = metricGroups(run.eval || {});
      if (!DATA.eval || !run.eval) {
        block.append(el("p", {class: "note", text: "metric deltas need eval/metrics.json in both runs"}));
      } else {
        const t = el("table", {class: "deltas"}, el("tr", {},
          ...["model", "direction", ...columns.map((c) => `${c}: this run → ${run.label} (Δ)`)]
            .map((h) => el("th", {text: h}))));
        for (const [model, byDirection] of here) {
          for (const [direction, values] of byDirection) {
            const others = (there.get(model) || new Map()).get(direction) || {};
            const cells = columns.map((column) => {
              if (values[column] === undefined) return el("td", {text: "–"});
              const b = others[column];
              const delta = b === undefined ? null : b - values[column];
              const better = column.startsWith("R@") ? delta > 0 : delta < 0;
              return el("td", {class: `num delta ${delta ? (better ? "delta-pos" : "delta-neg") : ""}`,
                               "data-key": `${model}/${direction}/${column}`, "data-delta": delta === null ? "" : delta,
                               text: `${fmt(values[column])} → ${fmt(b)} (${delta === null ? "–" :
                                      (delta > 0 ? "+" : "") + fmt(delta)})`});
            });
            t.append(el("tr", {}, el("td", {text: model}), el("td", {text: direction}), ...cells));
          }
        }
        block.append(el("h4", {text: "Metric deltas"}), t);
      }
      body.append(block);
    });
  }

  // ---- one image's card in a dialog (from the map, or #card=<image id>) ---------------------------------------
  function renderDialog(state) {
    const dialog = document.getElementById("card-dialog");
    const index = ROW_OF_ID.get(state.get("card") || "");
    if (index === undefined) {
      if (dialog.open) dialog.close();
      return;
    }
    document.getElementById("card-dialog-body").replaceChildren(card(index));
    if (!dialog.open) dialog.showModal();
  }

  let lastRetrievalKey = null;

  function render() {
    const started = performance.now();
    const state = readState();
    // One section shown at a time (#view=quality links to one); all are rendered, hidden ones included.
    const view = SECTIONS.includes(state.get("view")) ? state.get("view") : SECTIONS[0];
    for (const id of SECTIONS) document.getElementById(id).hidden = id !== view;
    for (const button of document.querySelectorAll("[data-goto]")) {
      button.classList.toggle("active", button.dataset.goto === view);
    }
    const matches = renderBrowse(state);
    // The retrieval view depends on its own keys only: a filter or page change of the browser leaves it as it is.
    const retrievalKey = `${state.get("rby")}|${state.get("rpage")}`;
    if (retrievalKey !== lastRetrievalKey) { renderRetrieval(state); lastRetrievalKey = retrievalKey; }
    if (view === "map") renderMap(state, matches);  // 10,000 points are drawn only where they are seen
    renderDialog(state);
    // Measured, not asserted: how long one filter/page change takes (milliseconds).
    document.body.setAttribute("data-render-ms", (performance.now() - started).toFixed(1));
  }

  for (const button of document.querySelectorAll("[data-goto]")) {
    button.addEventListener("click", () => { writeState({view: button.dataset.goto}); window.scrollTo(0, 0); });
  }
  setupFilters();
  setupHistograms();
  setupSelection();
  renderQuality();
  renderTraining();
  renderCompare();
  document.getElementById("card-dialog").addEventListener("close", () => {
    if (readState().get("card")) writeState({card: ""});
  });
  // For scripts and tests: what the page shows, in page coordinates where it is drawn.
  window.explorer = {
    filteredIds: () => filteredRows(readState()).map((index) => ROWS[index].i),
    selectionText: () => selectionText(filteredRows(readState())),
    pick: (ids) => { for (const id of ids) if (ROW_OF_ID.has(id)) PICKED.add(ROW_OF_ID.get(id)); render(); },
    mapPoints: () => {
      if (!map.canvas) return [];
      const box = map.canvas.getBoundingClientRect();
      return map.points.map((p) => ({id: ROWS[p.index].i, x: box.left + p.x, y: box.top + p.y, shown: p.shown}));
    },
  };
  render();
  window.addEventListener("hashchange", render);
  document.body.setAttribute("data-ready-ms", performance.now().toFixed(0));
  document.body.setAttribute("data-rendered", "1");
})();
