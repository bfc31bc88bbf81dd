// Strokes on the painting canvas: one mask canvas per stroke (image space, MASK_SIZE square,
// painted where alpha > 0), an undo history of stroke lists, and the erase tool.

export const MASK_SIZE = 256;
const COLORS = { add: '#0bc6d4', remove: '#e1484a', erase: '#ffffff' };

function newMask() {
  const canvas = document.createElement('canvas');
  canvas.width = MASK_SIZE;
  canvas.height = MASK_SIZE;
  canvas.getContext('2d', { willReadFrequently: true }); // masks are read back (isEmpty)
  return canvas;
}

function isEmpty(canvas) {
  const data = canvas.getContext('2d', { willReadFrequently: true })
    .getImageData(0, 0, canvas.width, canvas.height).data;
  for (let i = 3; i < data.length; i += 4) if (data[i] > 0) return false;
  return true;
}

export class Painter {
  // overlay: the canvas that receives the mouse and shows the strokes.
  // meta(): {concept, units, mode, strength, top} of the next stroke; onChange(strokes) after edits.
  constructor(overlay, { meta, onChange }) {
    this.overlay = overlay;
    this.overlay.width = MASK_SIZE;
    this.overlay.height = MASK_SIZE;
    this.meta = meta;
    this.onChange = onChange;
    this.tool = 'add';
    this.brush = 18;
    this.strokes = [];
    this.history = [];
    this.drawing = null;
    overlay.addEventListener('pointerdown', (e) => this.down(e));
    overlay.addEventListener('pointermove', (e) => this.move(e));
    overlay.addEventListener('pointerup', (e) => this.up(e));
    overlay.addEventListener('pointercancel', (e) => this.up(e));
  }

  point(event) {
    const box = this.overlay.getBoundingClientRect();
    return [(event.clientX - box.left) / box.width * MASK_SIZE, (event.clientY - box.top) / box.height * MASK_SIZE];
  }

  down(event) {
    if (event.button !== 0 || this.drawing) return;
    event.preventDefault();
    this.overlay.setPointerCapture(event.pointerId);
    const mode = this.tool === 'erase' ? 'erase' : this.tool;
    this.drawing = { mask: newMask(), mode, last: this.point(event) };
    this.dab(this.drawing.last, this.drawing.last);
  }

  move(event) {
    if (!this.drawing) return;
    const p = this.point(event);
    this.dab(this.drawing.last, p);
    this.drawing.last = p;
  }

  up(event) {
    if (!this.drawing) return;
    const { mask, mode } = this.drawing;
    this.drawing = null;
    if (this.overlay.hasPointerCapture(event.pointerId)) this.overlay.releasePointerCapture(event.pointerId);
    if (isEmpty(mask)) { this.render(); return; }
    if (mode === 'erase') this.erase(mask);
    else this.commit([...this.strokes, { ...this.meta(), mode, mask }]);
  }

  dab(from, to) {
    const ctx = this.drawing.mask.getContext('2d');
    ctx.strokeStyle = '#000';
    ctx.fillStyle = '#000';
    ctx.lineWidth = 2 * this.brush;
    ctx.lineCap = 'round';
    ctx.beginPath();
    ctx.moveTo(from[0], from[1]);
    ctx.lineTo(to[0] + 0.01, to[1]);
    ctx.stroke();
    this.render();
  }

  // Remove the erased pixels from every stroke (new mask canvases: history stays intact).
  erase(eraser) {
    const kept = [];
    for (const stroke of this.strokes) {
      const mask = newMask();
      const ctx = mask.getContext('2d');
      ctx.drawImage(stroke.mask, 0, 0);
      ctx.globalCompositeOperation = 'destination-out';
      ctx.drawImage(eraser, 0, 0);
      if (!isEmpty(mask)) kept.push({ ...stroke, mask, tinted: null });
    }
    this.commit(kept);
  }

  commit(strokes) {
    this.history.push(this.strokes);
    this.strokes = strokes;
    this.render();
    this.onChange(this.strokes);
  }

  undo() {
    if (!this.history.length) return false;
    this.strokes = this.history.pop();
    this.render();
    this.onChange(this.strokes);
    return true;
  }

  reset() {
    if (this.strokes.length) this.commit([]);
  }

  clear() { // a new image: no strokes, no history
    this.strokes = [];
    this.history = [];
    this.render();
  }

  tinted(stroke) {
    if (!stroke.tinted) {
      const canvas = newMask();
      const ctx = canvas.getContext('2d');
      ctx.drawImage(stroke.mask, 0, 0);
      ctx.globalCompositeOperation = 'source-in';
      ctx.fillStyle = COLORS[stroke.mode];
      ctx.fillRect(0, 0, MASK_SIZE, MASK_SIZE);
      stroke.tinted = canvas;
    }
    return stroke.tinted;
  }

  render() {
    const ctx = this.overlay.getContext('2d');
    ctx.clearRect(0, 0, MASK_SIZE, MASK_SIZE);
    ctx.globalAlpha = 0.45;
    for (const stroke of this.strokes) ctx.drawImage(this.tinted(stroke), 0, 0);
    if (this.drawing) {
      const live = { mask: this.drawing.mask, mode: this.drawing.mode };
      ctx.globalAlpha = this.drawing.mode === 'erase' ? 0.7 : 0.45;
      ctx.drawImage(this.tinted(live), 0, 0);
    }
    ctx.globalAlpha = 1;
  }

  // The strokes as the API's StrokeIn list.
  payload() {
    return this.strokes.map((s) => {
      const stroke = { mode: s.mode, strength: s.strength, mask: s.mask.toDataURL('image/png') };
      if (s.concept) stroke.concept = s.concept;
      if (s.units) stroke.units = s.units;
      if (s.top) stroke.top = s.top;
      return stroke;
    });
  }
}
