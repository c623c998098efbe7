// The HTML CI report's charts: reads the inlined timeline (the JSON report's `timeline`
// section) and draws one uPlot chart per series group. After each chart is drawn it counts the
// pixels of its series' colours on the canvas and writes the count into #render-check, so a
// headless browser test can tell a drawn chart from an empty one.
(function () {
  "use strict";
  var el = document.getElementById("timeline");
  var tl = null;
  try { tl = JSON.parse(el.textContent); } catch (e) { tl = null; }
  var box = document.getElementById("charts");
  var check = document.getElementById("render-check");
  if (!tl || !Array.isArray(tl.t) || tl.t.length === 0) {
    box.textContent = "This report has no timeline.";
    return;
  }
  var n = tl.t.length;
  var t = tl.t.map(Number);
  var end = Number(tl.end_secs);
  // Each interval's length: to the next point, the last one to the end of the run.
  var len = t.map(function (x, i) {
    var next = i + 1 < n ? t[i + 1] : end;
    var d = next - x;
    return d > 0 ? d : Number(tl.step_secs) || 1;
  });
  function col(key) { return Array.isArray(tl[key]) && tl[key].length === n ? tl[key] : null; }
  function rate(key) {
    var c = col(key);
    return c && c.map(function (v, i) { return v == null ? null : v / len[i]; });
  }
  var charts = [
    { id: "connected", title: "Connected identities (lowest sample per interval)",
      series: [{ label: "connected", data: col("connected"), color: "#1565c0" }] },
    { id: "rates", title: "Messages per second",
      series: [{ label: "generated", data: rate("generated"), color: "#2e7d32" },
               { label: "acked", data: rate("acked"), color: "#1565c0" },
               { label: "dropped", data: rate("dropped"), color: "#c62828" }] },
    { id: "latency", title: "PUBACK latency percentiles (ms)",
      series: [{ label: "p50", data: col("puback_p50_ms"), color: "#2e7d32" },
               { label: "p90", data: col("puback_p90_ms"), color: "#ef6c00" },
               { label: "p99", data: col("puback_p99_ms"), color: "#c62828" }] },
    { id: "faults", title: "Faults injected per interval (embedded emulator)",
      series: [{ label: "faults", data: col("faults"), color: "#6a1b9a" }] },
    { id: "reconnects", title: "Reconnects per interval",
      series: [{ label: "reconnects", data: col("reconnects"), color: "#795548" }] }
  ];
  function rgb(hex) {
    return [1, 3, 5].map(function (i) { return parseInt(hex.substr(i, 2), 16); });
  }
  // Pixels close to one of the series' colours: the lines themselves, not axes or grid.
  function seriesPixels(u, colors) {
    var c = u.ctx.canvas;
    var d = u.ctx.getImageData(0, 0, c.width, c.height).data;
    var count = 0;
    for (var i = 0; i < d.length; i += 4) {
      if (d[i + 3] < 128) continue;
      for (var k = 0; k < colors.length; k++) {
        var x = colors[k];
        if (Math.abs(d[i] - x[0]) + Math.abs(d[i + 1] - x[1]) + Math.abs(d[i + 2] - x[2]) < 60) { count++; break; }
      }
    }
    return count;
  }
  var width = Math.max(400, Math.min(960, box.clientWidth || 960));
  charts.forEach(function (def) {
    var div = document.createElement("div");
    div.className = "chart";
    div.id = "chart-" + def.id;
    var h = document.createElement("h3");
    h.textContent = def.title;
    div.appendChild(h);
    box.appendChild(div);
    var li = document.createElement("li");
    li.setAttribute("data-chart", def.id);
    check.appendChild(li);
    var series = def.series.filter(function (s) {
      return s.data && s.data.some(function (v) { return v != null; });
    });
    if (series.length === 0) {
      var p = document.createElement("p");
      p.className = "nodata";
      p.textContent = "Not measured in this run.";
      div.appendChild(p);
      li.setAttribute("data-status", "no-data");
      return;
    }
    var colors = series.map(function (s) { return rgb(s.color); });
    var opts = {
      width: width,
      height: 220,
      scales: { x: { time: false, range: function (u, lo, hi) { return [0, Math.max(hi, end, Number(tl.settle_from_secs) || 0)]; } }, y: { range: function (u, lo, hi) { return [0, hi > 0 ? hi * 1.1 : 1]; } } },
      axes: [{ label: "seconds since start" }, {}],
      series: [{ label: "time (s)" }].concat(series.map(function (s) {
        return { label: s.label, stroke: s.color, width: 2, points: { show: n < 60 } };
      })),
      hooks: {
        draw: [function (u) {
          // The settle period: faults lifted, no more readings (a dashed grey line).
          var settle = Number(tl.settle_from_secs);
          if (tl.settle_from_secs != null && isFinite(settle)) {
            var x = Math.round(u.valToPos(settle, "x", true));
            var ctx = u.ctx;
            ctx.save();
            ctx.strokeStyle = "#9e9e9e";
            ctx.setLineDash([6, 4]);
            ctx.lineWidth = 1;
            ctx.beginPath();
            ctx.moveTo(x, u.bbox.top);
            ctx.lineTo(x, u.bbox.top + u.bbox.height);
            ctx.stroke();
            ctx.restore();
          }
        }, function (u) {
          li.setAttribute("data-status", "drawn");
          li.setAttribute("data-series-pixels", String(seriesPixels(u, colors)));
        }]
      }
    };
    new uPlot(opts, [t].concat(series.map(function (s) { return s.data; })), div);
  });
})();
