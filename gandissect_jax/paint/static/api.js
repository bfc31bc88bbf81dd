// The GANPaint JSON API (see /openapi.json). Every call resolves to the parsed JSON or throws an
// Error whose message is the server's "detail".

async function request(path, options) {
  const response = await fetch(path, options);
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    throw new Error(`${path}: HTTP ${response.status}, not JSON`);
  }
  if (!response.ok) {
    const detail = body && body.detail;
    const text = Array.isArray(detail)
      ? detail.map((d) => `${(d.loc || []).join('.')}: ${d.msg}`).join('; ')
      : String(detail);
    throw new Error(`${path}: ${text}`);
  }
  return body;
}

export const get = (path) => request(path);

export const post = (path, payload) => request(path, {
  method: 'POST',
  headers: { 'Content-Type': 'application/json' },
  body: JSON.stringify(payload),
});

export function loadImage(src) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error('could not decode an image'));
    image.src = src;
  });
}
