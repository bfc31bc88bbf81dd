// GANPaint client: pick a sample (or upload a photo), pick a concept, paint; the server redraws.
// The server keeps no per-image state: every edit sends the whole stroke list.

import { get, post, loadImage } from './api.js';
import { decodeLabels, drawLabels, hexToRgb } from './labels.js';
import { Painter } from './painter.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

const state = {
  models: [], model: null, layer: null, colors: [],
  concepts: [], concept: null, units: [], disabled: new Map(),
  source: null, original: null, photo: null,
  seq: 0, inFlight: false, dirty: false, edits: 0, nextSeed: 0,
};

const painter = new Painter($('strokes'), { meta: strokeMeta, onChange: () => scheduleEdit() });

function setStatus(text, busy = false) {
  $('status').textContent = text;
  document.body.dataset.state = busy ? 'busy' : 'idle';
}

function fail(err) {
  setStatus(`⚠ ${err.message}`);
  document.body.dataset.state = 'idle';
}

// ------------------------------------------------------------------ drawing

function drawImage(canvas, image) {
  canvas.width = image.width;
  canvas.height = image.height;
  const ctx = canvas.getContext('2d');
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(image, 0, 0);
}

async function show(canvasId, segId, imageUrl, segUrl) {
  const [image, labels] = await Promise.all([loadImage(imageUrl), segUrl ? decodeLabels(segUrl) : null]);
  drawImage($(canvasId), image);
  if (labels) drawLabels($(segId), labels, state.colors);
  else $(segId).getContext('2d').clearRect(0, 0, $(segId).width, $(segId).height);
}

// ------------------------------------------------------------------ models, layers, concepts

async function init() {
  setStatus('loading models…', true);
  state.models = await get('/api/models');
  for (const m of state.models) $('model').add(new Option(m.name, m.name));
  const wanted = params.get('model');
  if (wanted && state.models.some((m) => m.name === wanted)) $('model').value = wanted;
  await selectModel($('model').value);
}

async function selectModel(name) {
  state.model = state.models.find((m) => m.name === name);
  state.colors = state.model.labels.map((l) => hexToRgb(l.color));
  $('layer').replaceChildren(...state.model.layers.map(
    (l) => new Option(`${l.layer} (${l.num_units} units, ${l.interpretable} interpretable)`, l.layer)));
  const wanted = params.get('layer');
  $('layer').value = wanted && state.model.layers.some((l) => l.layer === wanted) ? wanted : state.model.default_layer;
  $('top').value = state.model.default_top;
  state.nextSeed = Number(params.get('seed') || 0);
  await selectLayer($('layer').value);
  $('grid').replaceChildren();
  await loadSamples(12);
  await selectSeed(Number(params.get('seed') || 0));
}

async function selectLayer(layer) {
  state.layer = layer;
  const base = `/api/models/${encodeURIComponent(state.model.name)}/layers/${encodeURIComponent(layer)}`;
  const [concepts, units] = await Promise.all([get(`${base}/concepts?top=64`), get(`${base}/units`)]);
  state.concepts = concepts;
  state.units = units;
  state.disabled = new Map();
  renderPalette();
  const wanted = params.get('concept');
  selectConcept(concepts.some((c) => c.concept === wanted) ? wanted : (concepts[0] || {}).concept);
  if (state.source) await selectSource(state.source); // strokes belong to a layer: start over
}

function renderPalette() {
  const labelColor = (name) => state.model.labels.find((l) => l.label === name).color;
  $('palette').replaceChildren(...state.concepts.map((c, i) => {
    const button = document.createElement('button');
    button.type = 'button';
    button.dataset.concept = c.concept;
    button.setAttribute('role', 'radio');
    button.title = `${c.concept}: ranked by ${c.metric.toUpperCase()}${i < 9 ? ` (key ${i + 1})` : ''}`;
    const swatch = document.createElement('span');
    swatch.className = 'swatch';
    swatch.style.background = labelColor(c.concept);
    button.append(swatch, c.concept);
    button.addEventListener('click', () => selectConcept(c.concept));
    return button;
  }));
}

function selectConcept(concept) {
  state.concept = concept || null;
  for (const b of $('palette').children) b.setAttribute('aria-checked', String(b.dataset.concept === concept));
  renderUnits();
}

function customUnits() {
  const text = $('custom-units').value.trim();
  if (!text) return null;
  const units = text.split(/[\s,]+/).filter(Boolean).map(Number);
  const count = state.units.length;
  if (!units.every((u) => Number.isInteger(u) && u >= 0 && u < count)) return undefined; // invalid
  return [...new Set(units)];
}

function conceptUnits() { // [{unit, iou}] of the selected concept's top units
  const c = state.concepts.find((x) => x.concept === state.concept);
  if (!c) return [];
  const top = Math.max(1, Math.min(Number($('top').value) || state.model.default_top, c.units.length));
  return c.units.slice(0, top).map((unit, i) => ({ unit, iou: c.iou[i] }));
}

function renderUnits(used = null) {
  const custom = customUnits();
  $('custom-units').setAttribute('aria-invalid', String(custom === undefined));
  const rows = custom ? custom.map((unit) => ({ unit, iou: state.units[unit].iou })) : conceptUnits();
  const off = state.disabled.get(state.concept) || new Set();
  $('units-title').textContent = custom ? '(unit-level edit)' : state.concept ? `of ${state.concept}` : '';
  $('units').replaceChildren(...rows.map(({ unit, iou }) => {
    const info = state.units[unit];
    const label = document.createElement('label');
    label.setAttribute('role', 'listitem');
    if (used && used.has(unit)) label.className = 'used';
    const box = document.createElement('input');
    box.type = 'checkbox';
    box.checked = custom ? true : !off.has(unit);
    box.disabled = Boolean(custom);
    box.dataset.unit = unit;
    box.setAttribute('aria-label', `unit ${unit}`);
    box.addEventListener('change', () => {
      const set = state.disabled.get(state.concept) || new Set();
      if (box.checked) set.delete(unit); else set.add(unit);
      state.disabled.set(state.concept, set);
    });
    const text = document.createElement('span');
    text.textContent = `#${unit} ${info.label}${info.interpretable ? '' : ' (not interpretable)'}`;
    const score = document.createElement('span');
    score.className = 'iou';
    score.textContent = `IoU ${iou.toFixed(3)}`;
    label.append(box, text, score);
    return label;
  }));
}

// The meta of the next stroke: a concept's top units (minus unticked ones) or custom units.
function strokeMeta() {
  const strength = Number($('strength').value);
  const custom = customUnits();
  if (custom) return { concept: null, units: custom, strength, top: null };
  const off = state.disabled.get(state.concept) || new Set();
  const top = conceptUnits();
  const units = off.size ? top.map((u) => u.unit).filter((u) => !off.has(u)) : null;
  return { concept: state.concept, units: units && units.length ? units : null, strength, top: top.length };
}

// ------------------------------------------------------------------ images

async function loadSamples(count) {
  const seeds = Array.from({ length: count }, (_, i) => state.nextSeed + i);
  state.nextSeed += count;
  const { images } = await post('/api/generate', { model: state.model.name, seeds });
  for (const { seed, image } of images) {
    const button = document.createElement('button');
    button.type = 'button';
    button.dataset.seed = seed;
    button.title = `seed ${seed}`;
    button.setAttribute('aria-pressed', 'false');
    const img = document.createElement('img');
    img.src = image;
    img.alt = `sample, seed ${seed}`;
    button.append(img);
    button.addEventListener('click', () => selectSeed(seed));
    $('grid').append(button);
  }
}

async function selectSeed(seed) {
  for (const b of $('grid').children) b.setAttribute('aria-pressed', String(Number(b.dataset.seed) === seed));
  await selectSource({ seed });
}

// Start painting on a new image: its unedited image is the baseline that undo returns to.
async function selectSource(source) {
  state.source = source;
  state.seq += 1;
  painter.clear();
  setStatus('loading image…', true);
  $('original-title').textContent = source.photo ? 'Photo — paint here' : 'Original — paint here';
  try {
    const result = await post('/api/edit', { model: state.model.name, layer: state.layer, ...source, strokes: [] });
    state.original = { image: result.original, segmentation: result.original_segmentation };
    await show('original', 'original-seg', result.original, result.original_segmentation);
    await showOriginalAsResult();
    $('shares').replaceChildren();
    setStatus(source.photo ? `photo ${source.photo.slice(0, 8)}` : `seed ${source.seed}`);
  } catch (err) { fail(err); }
}

async function showOriginalAsResult() {
  await show('result', 'result-seg', state.original.image, state.original.segmentation);
}

// ------------------------------------------------------------------ edits

function scheduleEdit() {
  state.seq += 1;
  if (state.inFlight) { state.dirty = true; return; }
  runEdit();
}

async function runEdit() {
  const seq = state.seq;
  const strokes = painter.payload();
  if (!strokes.length) { // undo back to the start: the original pixels, exactly
    await showOriginalAsResult();
    $('shares').replaceChildren();
    renderUnits();
    setStatus('original');
    return;
  }
  state.inFlight = true;
  setStatus('painting…', true);
  const started = performance.now();
  try {
    const result = await post('/api/edit', { model: state.model.name, layer: state.layer, ...state.source, strokes });
    if (seq === state.seq) {
      await show('result', 'result-seg', result.image, result.segmentation);
      renderShares(result.shares);
      const last = result.strokes[result.strokes.length - 1];
      renderUnits(new Set(last ? last.units.map((u) => u.unit) : []));
      state.edits += 1;
      document.body.dataset.edits = state.edits;
      setStatus(`${strokes.length} stroke${strokes.length > 1 ? 's' : ''} · ${Math.round(performance.now() - started)} ms `
        + `(server ${Math.round(result.elapsed_ms)} ms)`);
    }
  } catch (err) { fail(err); }
  state.inFlight = false;
  if (state.dirty) { state.dirty = false; runEdit(); }
}

function renderShares(shares) {
  const pct = (x) => (x === null ? '–' : `${(100 * x).toFixed(1)}%`);
  const changed = shares
    .filter((s) => s.inside_before !== null)
    .map((s) => ({ ...s, change: Math.abs(s.inside_after - s.inside_before) }))
    .sort((a, b) => b.change - a.change)
    .slice(0, 6);
  const head = document.createElement('tr');
  head.innerHTML = '<th>label</th><th>painted: before</th><th>after</th><th>elsewhere: before</th><th>after</th>';
  $('shares').replaceChildren(head, ...changed.map((s) => {
    const row = document.createElement('tr');
    row.dataset.label = s.label;
    for (const text of [s.label, pct(s.inside_before), pct(s.inside_after), pct(s.outside_before), pct(s.outside_after)]) {
      const cell = document.createElement('td');
      cell.textContent = text;
      row.append(cell);
    }
    return row;
  }));
}

// ------------------------------------------------------------------ photos

async function upload(file) {
  if (!file) return;
  const dataUrl = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error('could not read the file'));
    reader.readAsDataURL(file);
  });
  setStatus('inverting the photo into the generator (seconds)…', true);
  try {
    const result = await post('/api/photos', { model: state.model.name, layer: state.layer, image: dataUrl });
    for (const b of $('grid').children) b.setAttribute('aria-pressed', 'false');
    $('photo-info').hidden = false;
    $('photo-info').textContent = `Photo inverted at ${result.layer}: reconstruction PSNR ${result.psnr_z.toFixed(1)} dB `
      + `from z, ${result.psnr_r.toFixed(1)} dB after refining r. Edits are blended into the photo where they change it.`;
    await selectSource({ photo: result.photo });
  } catch (err) { fail(err); }
}

// ------------------------------------------------------------------ controls

function setTool(tool) {
  painter.tool = tool;
  for (const b of $('tools').children) b.setAttribute('aria-pressed', String(b.dataset.tool === tool));
}

function setBrush(size) {
  const value = Math.max(2, Math.min(64, size));
  $('brush').value = value;
  painter.brush = value;
}

function toggleOverlay(on = !document.body.classList.contains('show-seg')) {
  document.body.classList.toggle('show-seg', on);
  $('overlay').checked = on;
}

$('model').addEventListener('change', () => selectModel($('model').value).catch(fail));
$('layer').addEventListener('change', () => selectLayer($('layer').value).catch(fail));
$('more').addEventListener('click', () => loadSamples(12).catch(fail));
$('upload').addEventListener('change', (e) => upload(e.target.files[0]).catch(fail));
for (const b of $('tools').children) b.addEventListener('click', () => setTool(b.dataset.tool));
$('brush').addEventListener('input', () => setBrush(Number($('brush').value)));
$('top').addEventListener('change', () => renderUnits());
$('custom-units').addEventListener('input', () => renderUnits());
$('undo').addEventListener('click', () => painter.undo());
$('reset').addEventListener('click', () => painter.reset());
$('overlay').addEventListener('change', () => toggleOverlay($('overlay').checked));

document.addEventListener('keydown', (e) => {
  if (e.target instanceof HTMLInputElement && ['text', 'number'].includes(e.target.type)) return;
  if (e.target instanceof HTMLSelectElement) return;
  const key = e.key.toLowerCase();
  if ((e.ctrlKey || e.metaKey) && key === 'z') { e.preventDefault(); painter.undo(); return; }
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (key === 'a') setTool('add');
  else if (key === 'r') setTool('remove');
  else if (key === 'e') setTool('erase');
  else if (key === 'u') painter.undo();
  else if (key === 's') toggleOverlay();
  else if (key === '[') setBrush(painter.brush - 2);
  else if (key === ']') setBrush(painter.brush + 2);
  else if (/^[1-9]$/.test(key) && state.concepts[Number(key) - 1]) selectConcept(state.concepts[Number(key) - 1].concept);
});

setBrush(Number($('brush').value));
init().catch(fail);
