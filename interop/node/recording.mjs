// keybroker recording format v1 (docs/RECORDING_FORMAT.md), written from the document alone.
// Only Node's built-in WebCrypto (HKDF-SHA256, AES-256-GCM, SHA-256); no npm dependencies.
// The data key comes from the caller (a storage service gets it from the broker's UnwrapDataKey).
import { webcrypto } from "node:crypto";

const subtle = webcrypto.subtle;

export const MAGIC = Uint8Array.from([0x4b, 0x42, 0x52, 0x45, 0x43]); // "KBREC"
export const VERSION = 1;
export const MIN_SEGMENT_SIZE = 4096;
export const MAX_SEGMENT_SIZE = 16 * 1024 * 1024;
export const MAX_RECORDING_ID = 255;
export const MAX_WRAPPED_KEY = 32768;
export const TAG = 16;
const FIXED = 49; // magic 5, version 1, segment size 4, salt 32, nonce prefix 7
const MAX_SEGMENTS = 2 ** 32;
const INFO_PREFIX = new TextEncoder().encode("keybroker recording v1\0");

/** Every refusal. `reason` is "not_a_recording" or "recording_integrity"; `stage` "header" (refused
 * before the data key was asked for) or "segments"; `released` the plaintext bytes written before. */
export class RecordingError extends Error {
  constructor(reason, stage, released = 0) {
    super(reason === "not_a_recording" ? "not a keybroker recording" : "recording is damaged or has been tampered with");
    this.name = "RecordingError";
    this.reason = reason;
    this.stage = stage;
    this.released = released;
  }
}

const damaged = (stage, released = 0) => new RecordingError("recording_integrity", stage, released);

function u16(n) {
  return Uint8Array.from([n >> 8, n & 0xff]);
}

function u32(n) {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, n);
  return b;
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** Encode a header (validating every bound). */
export function encodeHeader({ segmentSize, salt, noncePrefix, recordingId, wrappedKey }) {
  const rid = new TextEncoder().encode(recordingId);
  if (!(segmentSize >= MIN_SEGMENT_SIZE && segmentSize <= MAX_SEGMENT_SIZE)) throw new RangeError("segment size out of bounds");
  if (salt.length !== 32 || noncePrefix.length !== 7) throw new RangeError("salt must be 32 bytes, nonce prefix 7");
  if (rid.length < 1 || rid.length > MAX_RECORDING_ID) throw new RangeError("recording id must be 1..255 bytes");
  if (wrappedKey.length < 1 || wrappedKey.length > MAX_WRAPPED_KEY) throw new RangeError("wrapped key must be 1..32768 bytes");
  return concat([MAGIC, Uint8Array.of(VERSION), u32(segmentSize), salt, noncePrefix, u16(rid.length), rid, u16(wrappedKey.length), wrappedKey]);
}

/** The 32 file-key bytes: HKDF-SHA256(data key, salt, "keybroker recording v1" 00 SHA-256(header)). */
export async function fileKeyBytes(dataKey, header, salt) {
  if (dataKey.length !== 32) throw new RangeError("the data key is 32 bytes");
  const hash = new Uint8Array(await subtle.digest("SHA-256", header));
  const ikm = await subtle.importKey("raw", dataKey, "HKDF", false, ["deriveBits"]);
  return new Uint8Array(await subtle.deriveBits({ name: "HKDF", hash: "SHA-256", salt, info: concat([INFO_PREFIX, hash]) }, ikm, 256));
}

/** The file key as a non-extractable AES-GCM key. */
export async function fileKey(dataKey, header, salt, usages = ["encrypt", "decrypt"]) {
  return subtle.importKey("raw", await fileKeyBytes(dataKey, header, salt), { name: "AES-GCM" }, false, usages);
}

export function nonce(noncePrefix, index, last) {
  return concat([noncePrefix, u32(index), Uint8Array.of(last ? 1 : 0)]);
}

/** Reads exact byte counts from an async iterable of chunks, holding at most what was asked for
 * plus one incoming chunk. */
class Reader {
  constructor(source) {
    this.it = source[Symbol.asyncIterator] ? source[Symbol.asyncIterator]() : source[Symbol.iterator]();
    this.chunks = [];
    this.size = 0;
    this.done = false;
  }

  async fill(n) {
    while (this.size < n && !this.done) {
      const { value, done } = await this.it.next();
      if (done) this.done = true;
      else if (value.length) {
        const chunk = value instanceof Uint8Array ? value : new Uint8Array(value);
        this.chunks.push(chunk);
        this.size += chunk.length;
      }
    }
  }

  /** Up to n bytes (fewer only at the end of the stream). */
  async read(n) {
    await this.fill(n);
    const take = Math.min(n, this.size);
    const out = new Uint8Array(take);
    let at = 0;
    while (at < take) {
      const head = this.chunks[0];
      const k = Math.min(head.length, take - at);
      out.set(head.subarray(0, k), at);
      at += k;
      if (k === head.length) this.chunks.shift();
      else this.chunks[0] = head.subarray(k);
    }
    this.size -= take;
    return out;
  }
}

/** Read and bound-check the header of a recording (an async iterable of byte chunks). */
export async function readHeader(source) {
  return parseHeader(new Reader(source));
}

async function parseHeader(reader) {
  const fixed = await reader.read(FIXED);
  const magicOk = fixed.length >= MAGIC.length && MAGIC.every((b, i) => fixed[i] === b);
  if (!magicOk) throw new RecordingError("not_a_recording", "header");
  if (fixed.length < FIXED || fixed[5] !== VERSION) throw damaged("header");
  const segmentSize = new DataView(fixed.buffer, fixed.byteOffset).getUint32(6);
  if (segmentSize < MIN_SEGMENT_SIZE || segmentSize > MAX_SEGMENT_SIZE) throw damaged("header");
  const fields = [];
  for (const limit of [MAX_RECORDING_ID, MAX_WRAPPED_KEY]) {
    const len = await reader.read(2);
    if (len.length !== 2) throw damaged("header");
    const n = (len[0] << 8) | len[1];
    if (n < 1 || n > limit) throw damaged("header");
    const value = await reader.read(n);
    if (value.length !== n) throw damaged("header");
    fields.push(len, value);
  }
  let recordingId;
  try {
    // strict UTF-8, and a leading U+FEFF stays part of the id (it is a byte of it, not a BOM)
    recordingId = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(fields[1]);
  } catch {
    throw damaged("header");
  }
  return {
    segmentSize,
    salt: fixed.slice(10, 42),
    noncePrefix: fixed.slice(42, 49),
    recordingId,
    wrappedKey: fields[3],
    bytes: concat([fixed, ...fields]),
  };
}

/** Decrypt a recording from an async iterable of byte chunks (a file or socket stream).
 * `getDataKey(header)` returns (or resolves to) the 32-byte data key, typically from the broker.
 * `write(plaintext)` receives each segment's plaintext once it has authenticated. Throws
 * RecordingError on any defect, after writing what authenticated: discard the output unless
 * this resolves. Memory: two segments whatever the file size. Resolves to the header. */
export async function decryptStream(source, getDataKey, write) {
  const reader = new Reader(source);
  const header = await parseHeader(reader);
  const key = await fileKey(await getDataKey(header), header.bytes, header.salt, ["decrypt"]);
  const chunk = header.segmentSize + TAG;
  let released = 0;
  let current = await reader.read(chunk);
  for (let index = 0; ; index++) {
    if (current.length < TAG || index >= MAX_SEGMENTS) throw damaged("segments", released);
    // the final segment is the one nothing follows: look ahead before deciding the flag
    const following = current.length === chunk ? await reader.read(chunk) : new Uint8Array(0);
    const last = following.length === 0;
    if (last && index > 0 && current.length === TAG) throw damaged("segments", released);
    let plain;
    try {
      plain = new Uint8Array(await subtle.decrypt({ name: "AES-GCM", iv: nonce(header.noncePrefix, index, last), tagLength: 128 }, key, current));
    } catch {
      throw damaged("segments", released);
    }
    await write(plain);
    released += plain.length;
    if (last) return header;
    current = following;
  }
}

/** Encrypt plaintext chunks (an async iterable) into a recording; `write` receives the header,
 * then each sealed segment. `salt` and `noncePrefix` default to fresh random bytes (never reuse a
 * salt with the same data key). Resolves to the plaintext length. */
export async function encryptStream(source, write, { dataKey, recordingId, wrappedKey, segmentSize = 262144, salt, noncePrefix }) {
  salt = salt ?? webcrypto.getRandomValues(new Uint8Array(32));
  noncePrefix = noncePrefix ?? webcrypto.getRandomValues(new Uint8Array(7));
  const header = encodeHeader({ segmentSize, salt, noncePrefix, recordingId, wrappedKey });
  const key = await fileKey(dataKey, header, salt, ["encrypt"]);
  await write(header);
  const reader = new Reader(source);
  let total = 0;
  let current = await reader.read(segmentSize);
  for (let index = 0; ; index++) {
    if (index >= MAX_SEGMENTS) throw new RangeError("recording too large for one file");
    // a full segment is the last only if nothing follows it: never an empty segment after a full one
    const following = current.length === segmentSize ? await reader.read(segmentSize) : new Uint8Array(0);
    const last = following.length === 0;
    const sealed = await subtle.encrypt({ name: "AES-GCM", iv: nonce(noncePrefix, index, last), tagLength: 128 }, key, current);
    await write(new Uint8Array(sealed));
    total += current.length;
    if (last) return total;
    current = following;
  }
}

/** In-memory helpers: whole buffers in, whole buffers out. */
export async function encryptBytes(plaintext, options) {
  const out = [];
  await encryptStream([plaintext], (b) => out.push(b), options);
  return concat(out);
}

export async function decryptBytes(file, getDataKey) {
  const out = [];
  const header = await decryptStream([file], getDataKey, (b) => out.push(b));
  return { header, plaintext: concat(out) };
}
