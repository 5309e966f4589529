// Draws each meter's chart from its usage.json: cumulative usage per hour in the
// previous and the current period, the limit, and the forecast to the period's end.
"use strict";

function drawChart(el, data) {
  const prev = data.periods[0], cur = data.periods[1];
  const curStart = Date.parse(cur.start) / 1000, curEnd = Date.parse(cur.end) / 1000;
  const prevStart = Date.parse(prev.start) / 1000;
  const shift = curStart - prevStart;  // the previous period drawn under the current one
  const xs = new Set([curStart, curEnd]);
  cur.points.forEach(p => xs.add(p[0]));
  prev.points.forEach(p => xs.add(p[0] + shift));
  if (data.now > curStart && data.now < curEnd) xs.add(data.now);
  const x = Array.from(xs).filter(t => t >= curStart && t <= curEnd).sort((a, b) => a - b);
  const at = (points, offset) => {
    const m = new Map(points.map(p => [p[0] + offset, p[1]]));
    let last = null;
    return x.map(t => { if (m.has(t)) last = m.get(t); return t <= (offset ? curEnd : data.now) ? last : null; });
  };
  const current = at(cur.points, 0), previous = at(prev.points, shift);
  const limit = x.map(() => data.limit);
  const forecast = x.map(t => null);
  if (data.forecast && data.now < curEnd) {
    const i0 = x.indexOf(data.now), i1 = x.length - 1;
    if (i0 >= 0) {
      forecast[i0] = data.used;
      forecast[i1] = data.forecast.projected_at_period_end;
    }
  }
  const opts = {
    width: Math.max(320, el.clientWidth), height: 240,
    scales: { x: { time: true } },
    series: [
      {},
      { label: "this period", stroke: "#1f5fbf", width: 2 },
      { label: "previous period", stroke: "#9aa5b1", width: 1 },
      { label: "limit", stroke: "#c62828", width: 1 },
      { label: "forecast", stroke: "#ef8c00", dash: [6, 4], width: 2, spanGaps: true },
    ],
  };
  if (data.limit === null) opts.series[3].show = false;
  new uPlot(opts, [x, current, previous, limit, forecast], el);
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll(".chart[data-src]").forEach(el => {
    fetch(el.dataset.src, { credentials: "same-origin" })
      .then(r => r.ok ? r.json() : Promise.reject(r.status))
      .then(data => drawChart(el, data))
      .catch(err => { el.textContent = "chart unavailable (" + err + ")"; });
  });
});
