// TokenFlow dashboard: live node view (SSE), A/B reports, history. Charts: Apache ECharts.
'use strict';

const $ = (id) => document.getElementById(id);
const KEEP = 300; // live windows kept per chart
const HEAT_BOUNDS = ['≤0.5', '≤1', '≤2', '≤4', '≤8', '≤16', '≤32', '≤64', '≤128', '≤256', '≤512', '≤1024', '>1024'];
const charts = {};

function chart(id) {
  if (!charts[id]) charts[id] = echarts.init($(id));
  return charts[id];
}
window.addEventListener('resize', () => Object.values(charts).forEach((c) => c.resize()));

async function getJson(url) {
  const r = await fetch(url);
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((body.error && body.error.message) || `${r.status} ${url}`);
  return body;
}

function fmt(x, digits = 1) {
  return x === null || x === undefined || Number.isNaN(x) ? '–' : Number(x).toFixed(digits);
}

function lineOption(series, yName, extra = {}) {
  return Object.assign({
    animation: false,
    tooltip: { trigger: 'axis' },
    legend: { top: 0, type: 'scroll' },
    grid: { left: 55, right: 55, top: 45, bottom: 30 },
    xAxis: { type: 'time' },
    yAxis: { type: 'value', name: yName, nameGap: 8 },
    series: series.map((s) => Object.assign({ type: 'line', showSymbol: false }, s)),
  }, extra);
}

// ---------- views ----------
document.querySelectorAll('nav button').forEach((b) => b.addEventListener('click', () => {
  document.querySelectorAll('nav button').forEach((x) => x.classList.toggle('active', x === b));
  document.querySelectorAll('main > section').forEach((s) => { s.hidden = s.id !== `view-${b.dataset.view}`; });
  Object.values(charts).forEach((c) => c.resize());
  if (b.dataset.view === 'ab') loadReports();
}));

// ---------- live ----------
let source = null;
let frames = [];

async function loadNodes() {
  const nodes = await getJson('/v1/nodes');
  for (const sel of [$('node-select'), $('hist-node')]) {
    const keep = sel.value;
    sel.innerHTML = '';
    for (const n of nodes) sel.add(new Option(`${n.node_id}${n.stale ? ' (stale)' : ''}`, n.node_id));
    if (keep && nodes.some((n) => n.node_id === keep)) sel.value = keep;
  }
  return nodes;
}

function connect(node) {
  if (source) source.close();
  frames = [];
  if (!node) { $('live-status').textContent = 'no node has sent a window yet'; return; }
  $('live-status').textContent = `connecting to ${node}…`;
  source = new EventSource(`/v1/nodes/${encodeURIComponent(node)}/live`);
  source.addEventListener('window', (e) => {
    const f = JSON.parse(e.data);
    frames.push(f);
    if (frames.length > KEEP) frames.shift();
    $('live-status').textContent = `live: ${node}, window ${f.seq} at ${new Date(f.end_unix_ms).toLocaleTimeString()}`;
    $('live-status').classList.remove('error');
    renderLive();
  });
  source.addEventListener('error', (e) => {
    $('live-status').textContent = e.data ? e.data : 'stream interrupted: reconnecting…';
    $('live-status').classList.add('error');
  });
}

function renderLive() {
  const last = frames[frames.length - 1];
  const t = (f) => f.end_unix_ms;
  const hint = last.hints[0];
  $('live-seq').textContent = last.seq;
  $('live-p95').textContent = last.rtt_ms ? fmt(last.rtt_ms[1]) : '–';
  $('live-retrans').textContent = fmt(last.retransmit_rate_per_s);
  $('live-rate').textContent = hint ? fmt(hint.rate_limit_rps) : 'no client';
  $('live-controller').textContent = hint ? hint.controller : '–';
  $('live-anomaly').textContent = fmt(last.anomaly_score, 2);
  $('live-gpu').textContent = last.gpu.available ? `${last.gpu.devices.length} × ${last.gpu.devices[0] ? last.gpu.devices[0].name : ''}` : 'no GPU';

  const pct = (i) => frames.filter((f) => f.rtt_ms).map((f) => [t(f), f.rtt_ms[i]]);
  chart('chart-rtt').setOption(lineOption([
    { name: 'p50', data: pct(0) }, { name: 'p95', data: pct(1) }, { name: 'p99', data: pct(2) },
  ], 'ms'));
  $('chart-rtt').dataset.points = frames.length;

  const heat = [];
  let max = 1;
  frames.forEach((f, x) => f.rtt_heat.forEach((n, y) => { if (n > 0) { heat.push([x, y, n]); max = Math.max(max, n); } }));
  chart('chart-heat').setOption({
    animation: false,
    tooltip: { formatter: (p) => `${HEAT_BOUNDS[p.value[1]]} ms: ${p.value[2]} samples` },
    grid: { left: 60, right: 20, top: 10, bottom: 50 },
    xAxis: { type: 'category', data: frames.map((f) => new Date(t(f)).toLocaleTimeString()) },
    yAxis: { type: 'category', data: HEAT_BOUNDS, name: 'ms' },
    visualMap: { min: 0, max, calculable: false, orient: 'horizontal', left: 'center', bottom: 0, itemHeight: 120, show: true, textStyle: { fontSize: 10 } },
    series: [{ type: 'heatmap', data: heat }],
  });

  chart('chart-retrans').setOption(lineOption([
    { name: 'retransmits / s', data: frames.map((f) => [t(f), f.retransmit_rate_per_s]) },
    { name: 'active flows', data: frames.map((f) => [t(f), f.active_flows]), yAxisIndex: 1 },
  ], '/s', { yAxis: [{ type: 'value', name: '/s' }, { type: 'value', name: 'flows' }] }));

  chart('chart-backlog').setOption(lineOption([
    { name: 'accept queue', data: frames.map((f) => [t(f), f.accept_queue]) },
    { name: 'accept limit', data: frames.map((f) => [t(f), f.accept_queue_limit]), lineStyle: { type: 'dashed' } },
    { name: 'recv queue (KB)', data: frames.map((f) => [t(f), f.recv_queue_bytes / 1024]), yAxisIndex: 1 },
    { name: 'send queue (KB)', data: frames.map((f) => [t(f), f.send_queue_bytes / 1024]), yAxisIndex: 1 },
  ], 'conns', { yAxis: [{ type: 'value', name: 'conns' }, { type: 'value', name: 'KB' }] }));

  const gpuNone = $('gpu-none');
  if (!last.gpu.available) {
    gpuNone.hidden = false;
    gpuNone.textContent = `No GPU: ${last.gpu.reason || 'not available'} (provider ${last.gpu.provider})`;
    $('chart-gpu').hidden = true;
  } else {
    gpuNone.hidden = true;
    $('chart-gpu').hidden = false;
    const devs = last.gpu.devices.map((d) => d.index);
    const series = [];
    for (const i of devs) {
      const pick = (f) => f.gpu.devices.find((d) => d.index === i);
      series.push({ name: `GPU ${i} util %`, data: frames.filter((f) => pick(f)).map((f) => [t(f), pick(f).utilization_percent]) });
      series.push({ name: `GPU ${i} memory %`, data: frames.filter((f) => pick(f)).map((f) => [t(f), 100 * pick(f).memory_used_bytes / (pick(f).memory_total_bytes || 1)]) });
    }
    chart('chart-gpu').setOption(lineOption(series, '%'));
  }

  const ports = [...new Set(frames.flatMap((f) => f.request_latency.map((p) => p[0])))];
  chart('chart-reqlat').setOption(lineOption(ports.flatMap((port) => [
    { name: `:${port} p50`, data: frames.map((f) => [t(f), (f.request_latency.find((p) => p[0] === port) || [])[1]]).filter((p) => p[1] !== undefined) },
    { name: `:${port} p99`, data: frames.map((f) => [t(f), (f.request_latency.find((p) => p[0] === port) || [])[2]]).filter((p) => p[1] !== undefined) },
  ]), 'ms', { title: ports.length ? undefined : { text: 'no requests measured on watched ports', left: 'center', top: 'middle', textStyle: { fontSize: 12, color: '#5f6b7a' } } }), true);

  const clients = [...new Set(frames.flatMap((f) => f.hints.map((h) => h.client_id)))];
  const hintOf = (f, c) => f.hints.find((h) => h.client_id === c);
  chart('chart-hint-rate').setOption(lineOption(clients.flatMap((c) => [
    { name: `${c} req/s`, data: frames.filter((f) => hintOf(f, c)).map((f) => [t(f), hintOf(f, c).rate_limit_rps]) },
    { name: `${c} concurrency`, data: frames.filter((f) => hintOf(f, c)).map((f) => [t(f), hintOf(f, c).max_concurrency]), yAxisIndex: 1, lineStyle: { type: 'dashed' } },
  ]), 'req/s', { yAxis: [{ type: 'value', name: 'req/s' }, { type: 'value', name: 'in flight' }] }), true);
  chart('chart-hint-health').setOption(lineOption([
    { name: 'health', data: frames.filter((f) => f.hints[0]).map((f) => [t(f), f.hints[0].health]) },
    { name: 'anomaly score', data: frames.map((f) => [t(f), f.anomaly_score]) },
    { name: 'forecast p95 (ms)', data: frames.filter((f) => f.predicted_rtt_ms !== null).map((f) => [t(f), f.predicted_rtt_ms]), yAxisIndex: 1 },
  ], '0…1', { yAxis: [{ type: 'value', name: '0…1', max: 1 }, { type: 'value', name: 'ms' }] }));
}

$('node-select').addEventListener('change', (e) => connect(e.target.value));

// ---------- A/B ----------
let reportView = null;
const ARM_COLORS = { off: '#7f7f7f', pid: '#d62728', sigmoid: '#1f77b4', gradient2: '#2ca02c', aimd: '#ff7f0e' };

async function loadReports() {
  const sel = $('ab-report');
  if (sel.options.length) return;
  try {
    const list = await getJson('/v1/ab/reports');
    if (!list.length) { $('ab-status').textContent = 'no reports: run `cargo xtask demo`'; return; }
    for (const r of list) sel.add(new Option(`${r.name} (${r.scenarios.join(', ')})`, r.name));
    await openReport(sel.value);
  } catch (e) {
    $('ab-status').textContent = e.message;
    $('ab-status').classList.add('error');
  }
}

async function openReport(name) {
  $('ab-status').textContent = `loading ${name}…`;
  reportView = await getJson(`/v1/ab/reports/${encodeURIComponent(name)}`);
  const scen = $('ab-scenario');
  scen.innerHTML = '';
  for (const s of reportView.report.scenarios) scen.add(new Option(s.name, s.name));
  renderAb();
}

function metric(arm, path) {
  const [k, role] = path.split('.');
  const v = role ? (arm[k] || {})[role] : arm[k];
  return v && typeof v === 'object' && 'value' in v ? v : null;
}

function renderAb() {
  if (!reportView) return;
  const scenario = $('ab-scenario').value;
  const byArm = reportView.cdf[scenario] || {};
  const roles = [...new Set(Object.values(byArm).flatMap((r) => Object.keys(r)))];
  const roleSel = $('ab-role');
  const keep = roleSel.value;
  roleSel.innerHTML = '';
  for (const r of roles) roleSel.add(new Option(r, r));
  if (roles.includes(keep)) roleSel.value = keep;
  const role = roleSel.value;
  const cdfSeries = (key) => Object.entries(byArm).filter(([, r]) => r[role] && r[role][key].length).map(([arm, r]) => ({
    name: arm, type: 'line', showSymbol: false, color: ARM_COLORS[arm],
    data: r[role][key].map((ms, q) => [ms, q / 100]),
  }));
  const cdfOption = (key) => ({
    animation: false, tooltip: { trigger: 'axis' }, legend: { top: 0 },
    grid: { left: 55, right: 55, top: 45, bottom: 30 },
    xAxis: { type: 'log', name: 'ms', nameLocation: 'end' },
    yAxis: { type: 'value', min: 0, max: 1, name: 'fraction' },
    series: cdfSeries(key),
  });
  chart('chart-ab-cdf').setOption(cdfOption('ttft_ms'), true);
  chart('chart-ab-e2e').setOption(cdfOption('e2e_ms'), true);

  const arms = reportView.report.arms.filter((a) => a.scenario === scenario);
  const yPath = $('ab-y').value;
  const xPath = $('ab-x').value;
  const points = arms.map((a) => ({ arm: a.arm, x: metric(a, xPath), y: metric(a, yPath) })).filter((p) => p.x && p.y);
  chart('chart-ab-p99').setOption({
    animation: false, legend: { top: 0 }, tooltip: { trigger: 'item', formatter: (p) => `${p.seriesName}: ${fmt(p.value[0], 2)}, ${fmt(p.value[1], 0)} ms` },
    grid: { left: 60, right: 20, top: 45, bottom: 40 },
    xAxis: { type: 'value', name: xPath, nameLocation: 'middle', nameGap: 25, scale: true },
    yAxis: { type: 'value', name: `${yPath} (ms)`, scale: true },
    series: points.flatMap((p) => [
      { name: p.arm, type: 'scatter', color: ARM_COLORS[p.arm], symbolSize: 12, data: [[p.x.value, p.y.value]] },
      {
        // 95 % intervals in both directions, drawn by ECharts' custom series.
        name: p.arm, type: 'custom', color: ARM_COLORS[p.arm], silent: true,
        data: [[p.x.lo, p.x.hi, p.y.lo, p.y.hi, p.x.value, p.y.value]],
        renderItem: (params, api) => {
          const [xl, xh, yl, yh, xv, yv] = [0, 1, 2, 3, 4, 5].map((i) => api.value(i));
          const a = api.coord([xl, yv]); const b = api.coord([xh, yv]);
          const c = api.coord([xv, yl]); const d = api.coord([xv, yh]);
          const style = { stroke: api.visual('color'), lineWidth: 1.5 };
          return { type: 'group', children: [
            { type: 'line', shape: { x1: a[0], y1: a[1], x2: b[0], y2: b[1] }, style },
            { type: 'line', shape: { x1: c[0], y1: c[1], x2: d[0], y2: d[1] }, style },
          ] };
        },
      },
    ]),
  }, true);

  const targets = (reportView.report.targets || []).filter((t) => t.scenario === scenario || !t.scenario);
  $('ab-targets').innerHTML = '<tr><th>target</th><th>measured</th><th></th></tr>' + targets.map((t) =>
    `<tr><td>${escapeHtml(t.target)}</td><td>${escapeHtml(t.measured)}</td><td class="${t.met ? 'met' : 'missed'}">${t.met ? 'met' : 'missed'}</td></tr>`).join('');
  $('ab-status').textContent = `${reportView.name}: ${scenario}, ${arms.length} arms`;
  $('ab-status').dataset.arms = arms.length;
  $('ab-status').classList.remove('error');
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' }[c]));
}

$('ab-report').addEventListener('change', (e) => openReport(e.target.value).catch((err) => { $('ab-status').textContent = err.message; }));
for (const id of ['ab-scenario', 'ab-role', 'ab-y', 'ab-x']) $(id).addEventListener('change', renderAb);

// ---------- history ----------
function localInput(ms) {
  const d = new Date(ms - new Date(ms).getTimezoneOffset() * 60000);
  return d.toISOString().slice(0, 19);
}

async function loadHistory() {
  const node = $('hist-node').value;
  const from = new Date($('hist-from').value).getTime();
  const to = new Date($('hist-to').value).getTime();
  $('hist-status').textContent = '';
  $('hist-status').classList.remove('error');
  if (!node || Number.isNaN(from) || Number.isNaN(to)) {
    $('hist-status').textContent = 'choose a node and both times';
    $('hist-status').classList.add('error');
    return;
  }
  try {
    const h = await getJson(`/v1/history?node=${encodeURIComponent(node)}&from=${from}&to=${to}`);
    $('hist-count').textContent = h.count;
    const ws = h.windows;
    const t = (w) => w.end_unix_ms;
    const withRtt = ws.filter((w) => w.node.rtt.samples > 0);
    chart('chart-history').setOption(lineOption(['p50_us', 'p95_us', 'p99_us'].map((k) => ({
      name: k.replace('_us', ''), data: withRtt.map((w) => [t(w), w.node.rtt[k] / 1000]),
    })), 'ms'), true);
    chart('chart-history-load').setOption(lineOption([
      { name: 'retransmits / s', data: ws.map((w) => [t(w), w.node.retransmit_rate_per_s]) },
      { name: 'MB/s acked', data: ws.map((w) => [t(w), w.node.bytes_acked / 1e6 / Math.max((w.end_unix_ms - w.start_unix_ms) / 1000, 0.001)]), yAxisIndex: 1 },
    ], '/s', { yAxis: [{ type: 'value', name: '/s' }, { type: 'value', name: 'MB/s' }] }), true);
  } catch (e) {
    $('hist-status').textContent = e.message;
    $('hist-status').classList.add('error');
  }
}
$('hist-load').addEventListener('click', loadHistory);

// ---------- start ----------
(async () => {
  if (window.echartsMissing) { $('vendor-error').textContent = window.echartsMissing; return; }
  const now = Date.now();
  $('hist-from').value = localInput(now - 10 * 60 * 1000);
  $('hist-to').value = localInput(now);
  try {
    const nodes = await loadNodes();
    connect(nodes.length ? $('node-select').value : '');
  } catch (e) {
    $('live-status').textContent = e.message;
    $('live-status').classList.add('error');
  }
  // New nodes appear without a reload.
  setInterval(() => loadNodes().then((n) => { if (!source && n.length) connect($('node-select').value); }).catch(() => {}), 10000);
})();
