/* sourcetrace views: one front end for the HTML report, the web app and the notebook widget.
   Plain JS, no dependencies. `SourcetraceView.mount(root, data, hooks)` draws `data` (see payload.py);
   hooks.select(queryId, selection) and hooks.compare(queryId, text) return promises of updates
   ({queries: [...], train: {...}}) when a backend can attribute new selections. */
var SourcetraceView = (function () {
  "use strict";

  function h(tag, attrs) {
    var el = document.createElement(tag);
    var kids = Array.prototype.slice.call(arguments, 2);
    for (var k in attrs || {}) {
      var v = attrs[k];
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k.slice(0, 2) === "on") el.addEventListener(k.slice(2), v);
      else if (k === "style") el.setAttribute("style", v);
      else el.setAttribute(k, v === true ? "" : v);
    }
    kids.flat(3).forEach(function (c) {
      if (c === null || c === undefined || c === false) return;
      el.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
    });
    return el;
  }

  function fmt(x) {
    if (x === 0) return "0";
    var a = Math.abs(x);
    if (a >= 1000 && a < 1e6) return String(Math.round(x));
    return a >= 1e4 || a < 1e-3 ? x.toExponential(2) : x.toPrecision(3);
  }

  function thumb(img, size) {
    var c = h("canvas", { class: "st-thumb", width: img.w, height: img.h,
                          style: "width:" + size + "px;height:" + Math.round(size * img.h / img.w) + "px" });
    var ctx = c.getContext("2d");
    var d = ctx.createImageData(img.w, img.h);
    for (var i = 0; i < img.w * img.h; i++) {
      var v = 255 - img.data[i];  // ink is dark, as on paper
      d.data[4 * i] = d.data[4 * i + 1] = d.data[4 * i + 2] = v;
      d.data[4 * i + 3] = 255;
    }
    ctx.putImageData(d, 0, 0);
    return c;
  }

  function cellText(v) {
    return v === null || v === undefined ? "—" : String(v);
  }

  // a table row ({columns, values}) as a compact key/value table
  function kvTable(r) {
    return h("table", { class: "st-kv" }, h("tbody", null, r.columns.map(function (c, i) {
      return h("tr", null, h("th", null, c), h("td", null, cellText(r.values[i])));
    })));
  }

  // the first n cells of a row, inline: "col value · col value · +3"
  function rowSummary(r, n) {
    var cells = r.columns.slice(0, n).map(function (c, i) {
      var v = cellText(r.values[i]);
      return h("span", { class: "st-cell" }, h("span", { class: "st-col" }, c), " ", v.length > 24 ? v.slice(0, 23) + "…" : v);
    });
    var rest = r.columns.length - n;
    var all = r.columns.map(function (c, i) { return c + ": " + cellText(r.values[i]); }).join("\n");
    return h("span", { class: "st-rowsum", title: all }, cells, rest > 0 ? h("span", { class: "st-muted" }, "+" + rest) : null);
  }

  function bar(score, scale) {
    var w = scale > 0 ? Math.min(100, 100 * Math.abs(score) / scale) : 0;
    return h("span", { class: "st-bar" },
      h("span", { class: "st-fill " + (score >= 0 ? "st-pos" : "st-neg"), style: "width:" + w.toFixed(1) + "%" }));
  }

  function scaleOf(results) {
    var m = 0;
    results.forEach(function (r) {
      if (!r) return;
      r.top.concat(r.bottom).forEach(function (x) { m = Math.max(m, Math.abs(x.score)); });
    });
    return m;
  }

  function mount(root, data, hooks) {
    hooks = hooks || {};
    var ui = { q: 0, tab: "attribution", sel: null, last: null, open: {}, busy: false, msg: "" };
    var players = {};  // audio elements outlive redraws, so that a clip keeps playing while the page changes

    function player(a, key) {
      var el = players[key];
      if (!el || el.getAttribute("src") !== a.src) {
        el = players[key] = h("audio", { class: "st-audio", controls: true, preload: "metadata", src: a.src });
        if (a.start) {  // start at the matched moment (a data URI takes no #t= media fragment in every browser)
          var audio = el, seek = function () { audio.currentTime = a.start; };
          if (audio.readyState >= 1) seek(); else audio.addEventListener("loadedmetadata", seek, { once: true });
        }
      }
      return h("div", { class: "st-audiobox" }, el,
        a.start ? h("span", { class: "st-muted st-start" }, "starts at " + a.start + " s") : null,
        a.truncated ? h("span", { class: "st-muted" }, "first " + a.seconds + " s of " + a.truncated + " s") : null);
    }

    function query() { return data.queries[ui.q]; }
    function canSelect() { return !!(hooks.select && data.can_attribute); }

    function merge(update) {
      (update.queries || []).forEach(function (q) {
        if (q.index < data.queries.length) data.queries[q.index] = q; else data.queries.push(q);
      });
      for (var k in update.train || {}) data.train[k] = update.train[k];
      if (update.groups) data.groups = update.groups;
    }

    function run(promise, done) {
      ui.busy = true; ui.msg = "attributing…"; draw();
      promise.then(function (update) {
        merge(update); ui.busy = false; ui.msg = ""; ui.sel = null; if (done) done(); draw();
      }, function (err) {
        ui.busy = false; ui.msg = "error: " + (err && err.message ? err.message : err); draw();
      });
    }

    function tokens(q, opts) {
      opts = opts || {};
      var toks = q.tokens || [];
      var sel = opts.selection || {};
      var spanAt = {};
      (q.spans || []).forEach(function (s, si) { for (var i = s.start; i < s.end; i++) spanAt[i] = si; });
      var box = h("div", { class: "st-tokens" + (opts.selectable ? " st-selectable" : "") });
      toks.forEach(function (t, i) {
        var cls = "st-tok", style = null;
        if (sel[i]) cls += " st-sel";
        if (opts.mark && opts.mark[i]) cls += " " + opts.markClass;
        if (spanAt[i] !== undefined) cls += " st-span";
        if (opts.scores) {
          var v = opts.scores[i] / (opts.scoreMax || 1);
          var col = v >= 0 ? "22,163,74" : "220,38,38";
          var a = Math.min(1, Math.abs(v)) * 0.55;
          if (a > 0.03) style = "background:rgba(" + col + "," + a.toFixed(2) + ")";
        }
        var title = spanAt[i] !== undefined ? "verbatim in corpus: " + (q.spans[spanAt[i]].count || "?") + " matches" :
          opts.scores ? "contribution " + fmt(opts.scores[i]) : null;
        var el = h("span", { class: cls, "data-i": i, style: style || null, title: title,
          onclick: opts.selectable ? function (ev) { opts.onToggle(i, ev.shiftKey); } : null }, t);
        box.appendChild(el);
        if (q.joiner === " " && i < toks.length - 1) box.appendChild(document.createTextNode(" "));
      });
      return box;
    }

    function queryCard(q) {
      var card = h("section", { class: "st-card st-query" });
      var head = h("div", { class: "st-qhead" });
      if (q.image) head.appendChild(thumb(q.image, 112));
      head.appendChild(h("div", null,
        h("div", { class: "st-qid" }, "query " + q.id),
        q.label !== undefined ? h("div", null, "label ", h("b", null, q.label)) : null,
        q.source !== undefined ? h("div", { class: "st-muted" }, q.source) : null));
      if (q.row) head.appendChild(kvTable(q.row));
      card.appendChild(head);
      if (q.audio) card.appendChild(player(q.audio, "q" + q.index));
      if (q.prompt !== undefined) card.appendChild(h("div", { class: "st-prompt" }, h("span", { class: "st-tag" }, "prompt"), q.prompt));
      if (q.tokens) {
        if (ui.sel === null) { ui.sel = {}; (q.selection || []).forEach(function (i) { ui.sel[i] = true; }); }
        card.appendChild(h("div", { class: "st-gen" }, h("span", { class: "st-tag" }, "generated"),
          tokens(q, { selection: ui.sel, selectable: canSelect(), onToggle: toggle })));
        var n = Object.keys(ui.sel).length;
        card.appendChild(h("div", { class: "st-controls" },
          canSelect() ? [
            h("button", { id: "st-attribute", disabled: ui.busy || !n, onclick: attribute }, "Attribute selection (" + n + ")"),
            h("button", { id: "st-clear", disabled: ui.busy, onclick: function () { ui.sel = {}; draw(); } }, "Clear")
          ] : h("span", { class: "st-muted" }, "Attributed tokens are highlighted. Run `sourcetrace serve` or the notebook widget to attribute other selections."),
          h("span", { class: "st-status", id: "st-status" }, ui.msg)));
        if (q.spans && q.spans.length) card.appendChild(spansList(q));
      } else if (q.text !== undefined) {
        card.appendChild(h("div", { class: "st-text" }, q.text));
      }
      return card;
    }

    function spansList(q) {
      return h("details", { class: "st-spans" }, h("summary", null, q.spans.length + " verbatim spans in the corpus"),
        h("ul", null, q.spans.map(function (s) {
          return h("li", null, h("q", null, s.text || (q.tokens || []).slice(s.start, s.end).join(q.joiner || "")),
            " × " + (s.count === null || s.count === undefined ? "?" : s.count),
            (s.docs || []).slice(0, 3).map(function (d) {
              var label = "doc " + (d.doc_id !== undefined ? d.doc_id : d.doc_index);
              return h("div", { class: "st-doc" }, d.href ? h("a", { href: d.href }, label) : h("b", null, label), ": …",
                d.before || "", h("mark", null, d.match || ""), d.after || "", "…");
            }));
        })));
    }

    function toggle(i, range) {
      if (range && ui.last !== null) {
        var lo = Math.min(ui.last, i), hi = Math.max(ui.last, i);
        for (var j = lo; j <= hi; j++) ui.sel[j] = true;
      } else if (ui.sel[i]) delete ui.sel[i]; else ui.sel[i] = true;
      ui.last = i; draw();
    }

    function attribute() {
      var selection = Object.keys(ui.sel).map(Number).sort(function (a, b) { return a - b; });
      run(Promise.resolve(hooks.select(query().id, selection)));
    }

    function row(r, kind, rank, scale, key) {
      var t = data.train[String(r.index)] || { id: r.index };
      var open = !!ui.open[key];
      var desc = t.text !== undefined ? t.text : "";
      var el = h("li", { class: "st-row st-" + kind, "data-index": r.index },
        h("div", { class: "st-rowhead", onclick: function () { ui.open[key] = !open; draw(); } },
          h("span", { class: "st-rank" }, rank),
          t.image ? thumb(t.image, 28) : null,
          h("span", { class: "st-what" + (t.row ? " st-wrap" : "") },
            h("span", { class: "st-tid" }, "#" + t.id),
            t.label !== undefined ? h("span", { class: "st-label" }, t.label) : null,
            t.source !== undefined ? h("span", { class: "st-source" }, t.source) : null,
            desc ? h("span", { class: "st-snippet" }, desc.length > 90 && !open ? desc.slice(0, 90) + "…" : (open ? "" : desc)) : null,
            t.row && !open ? rowSummary(t.row, 3) : null),
          bar(r.score, scale), h("span", { class: "st-score" }, fmt(r.score))));
      if (t.audio) el.appendChild(h("div", { class: "st-rowmedia" }, player(t.audio, key)));
      if (open) {
        var full = h("div", { class: "st-full" });
        if (t.image) full.appendChild(thumb(t.image, 96));
        if (t.row) full.appendChild(kvTable(t.row));
        if (t.tokens && r.token_scores) {
          var m = 0; r.token_scores.forEach(function (v) { m = Math.max(m, Math.abs(v)); });
          full.appendChild(tokens(t, { scores: r.token_scores, scoreMax: m }));
          full.appendChild(h("div", { class: "st-muted st-tokennote" }, data.token_scores_note || "shaded: each token's share of the score (green supports, red opposes)"));
        } else if (desc) full.appendChild(h("div", { class: "st-text" }, desc));
        el.appendChild(full);
      }
      return el;
    }

    function lists(res, scale, prefix) {
      if (data.magnitude) {  // distances have no sign: the largest only, no opponents
        return h("div", { class: "st-lists" },
          h("section", { class: "st-card" }, h("h3", null, "Largest change ", h("span", { class: "st-muted" }, "removing it moves the output most")),
            h("ol", { class: "st-list", id: prefix + "top" }, res.top.map(function (r, i) { return row(r, "pos", i + 1, scale, prefix + "t" + r.index); }))));
      }
      return h("div", { class: "st-lists" },
        h("section", { class: "st-card" }, h("h3", null, "Proponents ", h("span", { class: "st-muted" }, "support the output")),
          h("ol", { class: "st-list", id: prefix + "top" }, res.top.map(function (r, i) { return row(r, "pos", i + 1, scale, prefix + "t" + r.index); }))),
        h("section", { class: "st-card" }, h("h3", null, "Opponents ", h("span", { class: "st-muted" }, "oppose the output")),
          h("ol", { class: "st-list", id: prefix + "bottom" }, res.bottom.map(function (r, i) { return row(r, "neg", i + 1, scale, prefix + "b" + r.index); }))));
    }

    function histogram(res) {
      var H = res.hist, W = 360, HT = 96, pad = 4;
      var svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
      svg.setAttribute("viewBox", "0 0 " + W + " " + (HT + 26)); svg.setAttribute("class", "st-hist");
      if (!H.counts.length) return svg;
      var lo = H.edges[0], hi = H.edges[H.edges.length - 1], span = hi - lo || 1;
      var cmax = Math.max.apply(null, H.counts) || 1, bw = (W - 2 * pad) / H.counts.length;
      function x(v) { return pad + (v - lo) / span * (W - 2 * pad); }
      function add(tag, attrs) {
        var e = document.createElementNS("http://www.w3.org/2000/svg", tag);
        for (var k in attrs) e.setAttribute(k, attrs[k]);
        svg.appendChild(e); return e;
      }
      H.counts.forEach(function (c, i) {
        var hh = c ? Math.max(1, c / cmax * (HT - 10)) : 0;
        add("rect", { x: pad + i * bw + 0.5, y: HT - hh, width: Math.max(1, bw - 1), height: hh, class: "st-hbar" }).appendChild(
          (function () { var t = document.createElementNS("http://www.w3.org/2000/svg", "title"); t.textContent = c + " in [" + fmt(H.edges[i]) + ", " + fmt(H.edges[i + 1]) + ")"; return t; })());
      });
      res.top.forEach(function (r) { add("line", { x1: x(r.score), x2: x(r.score), y1: HT + 2, y2: HT + 11, class: "st-mpos" }); });
      res.bottom.forEach(function (r) { add("line", { x1: x(r.score), x2: x(r.score), y1: HT + 2, y2: HT + 11, class: "st-mneg" }); });
      if (lo < 0 && hi > 0) add("line", { x1: x(0), x2: x(0), y1: 0, y2: HT, class: "st-zero" });
      add("text", { x: pad, y: HT + 24, class: "st-axis" }).textContent = fmt(lo);
      add("text", { x: W - pad, y: HT + 24, class: "st-axis", "text-anchor": "end" }).textContent = fmt(hi);
      return svg;
    }

    function summary(res) {
      var kw = res.keywords;
      function chips(list, cls) {
        return h("div", { class: "st-chips" }, (list || []).map(function (w) { return h("span", { class: "st-chip " + cls, title: "tf-idf " + fmt(w[1]) }, w[0]); }));
      }
      return h("div", { class: "st-lists" },
        kw ? h("section", { class: "st-card st-keywords" }, h("h3", null, "Keywords of the shown examples"),
          h("div", { class: "st-muted" }, "proponents"), chips(kw.pos, "st-pos"),
          h("div", { class: "st-muted" }, "opponents"), chips(kw.neg, "st-neg")) : null,
        h("section", { class: "st-card" }, h("h3", null, "All scores ", h("span", { class: "st-muted" }, res.partial ? "(only the kept extremes)" : "(ticks: shown examples)")), histogram(res)),
        res.removal ? h("section", { class: "st-card", id: "st-removal" }, h("h3", null, "What if they were removed?"),
          h("div", null, "Without the shown proponents (" + res.removal.k + "), the measurement would change by ", h("b", { class: "st-neg" }, fmt(res.removal.top)), "."),
          h("div", null, "Without the shown opponents (" + res.removal.k + "), by ", h("b", { class: "st-pos" }, fmt(res.removal.bottom)), "."),
          h("div", { class: "st-muted" }, "Predicted to first order from the scores (derivatives of the measurement in each example's weight).")) : null);
    }

    function attributionView(q) {
      var res = q.result;
      return [queryCard(q), lists(res, scaleOf([res]), "st-"), summary(res)];
    }

    function groupsView(q) {
      if (!data.groups || !data.groups.length) return h("section", { class: "st-card" }, "No groups: give training items a label or source, or pass groups=.");
      return data.groups.map(function (g) {
        var mine = g.query[q.index] || [], scale = 0;
        mine.concat(g.mean).forEach(function (v) { scale = Math.max(scale, Math.abs(v)); });
        return h("section", { class: "st-card st-groups" }, h("h3", null, "Score mass per " + g.name),
          h("table", null, h("thead", null, h("tr", null, h("th", null, g.name), h("th", null, "n"),
            h("th", null, "this query"), h("th", null, ""), h("th", null, "mean over all " + data.queries.length + " queries"), h("th", null, ""))),
          h("tbody", null, g.names.map(function (name, j) {
            return h("tr", null, h("td", null, name), h("td", { class: "st-muted" }, g.sizes[j]),
              h("td", null, bar(mine[j], scale)), h("td", { class: "st-score" }, fmt(mine[j])),
              h("td", null, bar(g.mean[j], scale)), h("td", { class: "st-score" }, fmt(g.mean[j])));
          }))));
      });
    }

    function compareView(q) {
      var c = q.compare;
      var out = [];
      if (hooks.compare && data.can_attribute && q.tokens) {
        var prev = c ? data.queries[c.other] : q;  // keep the user's last text in the box
        var area = h("textarea", { id: "st-user-text", rows: 2 }, (prev.tokens || []).join(prev.joiner || " "));
        out.push(h("section", { class: "st-card" }, h("h3", null, "Your text"), area,
          h("div", { class: "st-controls" }, h("button", { id: "st-compare", disabled: ui.busy, onclick: function () {
            run(Promise.resolve(hooks.compare(q.id, area.value)));
          } }, "Compare with the model's text"), h("span", { class: "st-status" }, ui.msg))));
      }
      if (!c) { out.push(h("section", { class: "st-card" }, "No comparison for this query yet.")); return out; }
      var b = data.queries[c.other];
      if (c.image && q.image && b.image) return out.concat(imageCompare(q, b, c));
      var rem = {}, add = {};
      c.removed.forEach(function (i) { rem[i] = true; }); c.added.forEach(function (i) { add[i] = true; });
      var scale = scaleOf([q.result, b.result]);
      out.push(h("div", { class: "st-compare" },
        h("div", { class: "st-side", id: "st-side-model" }, h("section", { class: "st-card" }, h("h3", null, "Model's text ", h("span", { class: "st-muted" }, "removed words attributed")),
          tokens(q, { mark: rem, markClass: "st-del" })), lists(q.result, scale, "st-a-")),
        h("div", { class: "st-side", id: "st-side-user" }, h("section", { class: "st-card" }, h("h3", null, "User's text ", h("span", { class: "st-muted" }, "added words attributed")),
          tokens(b, { mark: add, markClass: "st-ins" })), lists(b.result, scale, "st-b-"))));
      out.push(h("div", { class: "st-muted" }, "Both sides share one scale (largest |score| shown: " + fmt(scale) + ")."));
      return out;
    }

    function imageCompare(q, b, c) {
      function figure(id, img, caption) {
        return h("figure", { class: "st-fig", id: id }, thumb(img, 160), h("figcaption", null, caption));
      }
      var scale = scaleOf([q.result, b.result]);
      return [h("section", { class: "st-card st-imgcompare" },
        h("h3", null, "Side by side ", h("span", { class: "st-muted" }, "this query and the one it is compared with")),
        h("div", { class: "st-figs" },
          figure("st-img-a", q.image, String(q.id)),
          figure("st-img-b", b.image, String(b.id)),
          figure("st-img-diff", c.image.diff, "difference |a − b|, darkest = " + fmt(c.image.diff_max))),
        h("div", null, "L2 distance between the two images: ", h("b", { id: "st-img-dist" }, fmt(c.image.distance)))),
        h("div", { class: "st-compare" },
          h("div", { class: "st-side", id: "st-side-model" }, lists(q.result, scale, "st-a-")),
          h("div", { class: "st-side", id: "st-side-user" }, lists(b.result, scale, "st-b-"))),
        h("div", { class: "st-muted" }, "Left: " + q.id + "; right: " + b.id + ". Both sides share one scale (largest |score| shown: " + fmt(scale) + ").")];
    }

    function draw() {
      var q = query();
      var tabs = [["attribution", "Attribution"], ["groups", "Groups"], ["compare", "Compare"]];
      var nav = h("nav", { class: "st-tabs" }, tabs.map(function (t) {
        return h("button", { class: "st-tab" + (ui.tab === t[0] ? " st-on" : ""), "data-tab": t[0], onclick: function () { ui.tab = t[0]; draw(); } }, t[1]);
      }));
      var aside = h("aside", { class: "st-qlist" }, data.queries.map(function (x, i) {
        var name = x.label !== undefined && x.tokens === undefined ? x.label : (x.prompt || x.text ||
          (x.row ? x.row.columns.slice(0, 2).map(function (c, j) { return cellText(x.row.values[j]); }).join(" · ") : ""));
        return h("button", { class: "st-qbtn" + (i === ui.q ? " st-on" : ""), "data-q": i, onclick: function () { ui.q = i; ui.sel = null; ui.open = {}; draw(); } },
          x.image ? thumb(x.image, 24) : null, h("span", null, String(x.id)), h("span", { class: "st-muted" }, String(name).slice(0, 28)));
      }));
      var view = ui.tab === "groups" ? groupsView(q) : ui.tab === "compare" ? compareView(q) : attributionView(q);
      var app = h("div", { class: "st-app st-" + data.kind },
        h("header", null, h("h1", null, data.title), h("span", { class: "st-muted" },
          (data.method || "scores") + " · " + data.queries.length + " queries · " +
          (data.magnitude ? (data.distance || "") + " distance, no sign: larger = removing the example moves the output more" : "positive = proponent"))),
        nav, h("div", { class: "st-body" }, data.queries.length > 1 ? aside : null, h("main", null, view)));
      root.replaceChildren(app);
      root.setAttribute("data-ready", "1");
    }

    draw();
    return {
      update: function (next) { data = next; if (ui.q >= data.queries.length) ui.q = 0; ui.sel = null; ui.busy = false; ui.msg = ""; draw(); },
      merge: function (update) { merge(update); draw(); },
      state: ui
    };
  }

  function fetchHooks(base) {
    function call(path, body) {
      return fetch(base + path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) })
        .then(function (r) { return r.json().then(function (j) { if (!r.ok) throw new Error(j.detail ? JSON.stringify(j.detail) : r.status); return j; }); });
    }
    return {
      select: function (id, selection) { return call("/queries/" + encodeURIComponent(id) + "/attribute", { selection: selection }); },
      compare: function (id, text) { return call("/queries/" + encodeURIComponent(id) + "/compare", { text: text }); }
    };
  }

  return { mount: mount, fetchHooks: fetchHooks };
})();
