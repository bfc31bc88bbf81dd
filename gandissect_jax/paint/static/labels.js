// Segmentations arrive as PNGs whose pixel (R, G, B) holds the label number R + 256 G.

import { loadImage } from './api.js';

export function hexToRgb(hex) {
  const value = parseInt(hex.slice(1), 16);
  return [(value >> 16) & 255, (value >> 8) & 255, value & 255];
}

// Label numbers (Uint16Array, row-major) and size of a label PNG data URL.
export async function decodeLabels(dataUrl) {
  const image = await loadImage(dataUrl);
  const canvas = document.createElement('canvas');
  canvas.width = image.width;
  canvas.height = image.height;
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  ctx.drawImage(image, 0, 0);
  const rgba = ctx.getImageData(0, 0, image.width, image.height).data;
  const labels = new Uint16Array(image.width * image.height);
  for (let i = 0; i < labels.length; i += 1) labels[i] = rgba[4 * i] + 256 * rgba[4 * i + 1];
  return { labels, width: image.width, height: image.height };
}

// Draw decoded labels in their palette colours onto a canvas (label 0 transparent).
export function drawLabels(canvas, decoded, colors) {
  canvas.width = decoded.width;
  canvas.height = decoded.height;
  const ctx = canvas.getContext('2d');
  const picture = ctx.createImageData(decoded.width, decoded.height);
  decoded.labels.forEach((label, i) => {
    if (label === 0) return;
    const [r, g, b] = colors[label] || [255, 0, 255];
    picture.data.set([r, g, b, 255], 4 * i);
  });
  ctx.putImageData(picture, 0, 0);
}
