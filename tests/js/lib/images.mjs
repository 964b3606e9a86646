// Small, valid PNG files made in the test, with optional text chunks (metadata a thumbnail must
// not keep) and a header that may claim any size (a decompression bomb).
import { deflateSync } from 'node:zlib';

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

export function crc32(buf) {
  let c = 0xffffffff;
  for (const b of buf) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function chunk(type, data) {
  const len = Buffer.alloc(4);
  len.writeUInt32BE(data.length);
  const body = Buffer.concat([Buffer.from(type, 'ascii'), data]);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(body));
  return Buffer.concat([len, body, crc]);
}

/**
 * An RGB PNG of width × height pixels. options.text: a tEXt chunk {keyword: value};
 * options.claim: [w, h] written into the header instead (the pixels stay width × height).
 */
export function png(width, height, { text, claim } = {}) {
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(claim ? claim[0] : width, 0);
  ihdr.writeUInt32BE(claim ? claim[1] : height, 4);
  ihdr[8] = 8; ihdr[9] = 2; // 8-bit RGB
  const rows = [];
  for (let y = 0; y < height; y++) {
    const row = Buffer.alloc(1 + width * 3);
    for (let x = 0; x < width; x++) row.set([(x >> 2) & 0xff, (y >> 2) & 0xff, 128], 1 + x * 3);
    rows.push(row);
  }
  const parts = [Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), chunk('IHDR', ihdr)];
  for (const [k, v] of Object.entries(text ?? {})) parts.push(chunk('tEXt', Buffer.from(`${k}\0${v}`, 'latin1')));
  parts.push(chunk('IDAT', deflateSync(Buffer.concat(rows))), chunk('IEND', Buffer.alloc(0)));
  return Buffer.concat(parts);
}

/** Width and height from a PNG's header. */
export function pngSize(buf) {
  assert8(buf);
  return [buf.readUInt32BE(16), buf.readUInt32BE(20)];
}

function assert8(buf) {
  if (buf.subarray(1, 4).toString('ascii') !== 'PNG') throw new Error('not a PNG');
}
