#!/usr/bin/env node
// keybroker-recording: the Node.js implementation of recording format v1 on the command line.
//
//   cli.mjs header                      < file        JSON: recording_id, wrapped_key (hex), segment_size
//   cli.mjs decrypt --key HEX           < file > plain   exit 1 and a JSON error on stderr on any defect
//   cli.mjs encrypt --key HEX --recording-id ID --wrapped-key HEX [--segment-size N] < plain > file
//   cli.mjs vectors FILE                JSON: the outcome of every known-answer vector
//
// The data key (hex) is what the broker's UnwrapDataKey / GenerateDataKey returned.
import { readFileSync } from "node:fs";
import { createHash } from "node:crypto";
import { RecordingError, decryptBytes, decryptStream, encryptBytes, encryptStream, fileKeyBytes, nonce, readHeader } from "./recording.mjs";

const hex = (b) => Buffer.from(b).toString("hex");
const bytes = (h) => new Uint8Array(Buffer.from(h, "hex"));

function option(args, name, fallback) {
  const i = args.indexOf(name);
  if (i < 0 || i + 1 >= args.length) {
    if (fallback !== undefined) return fallback;
    throw new Error(`missing ${name}`);
  }
  return args[i + 1];
}

async function writeOut(chunk) {
  if (!process.stdout.write(chunk)) await new Promise((resolve) => process.stdout.once("drain", resolve));
}

function assemble(parts, files) {
  return Buffer.concat(parts.map((p) => ("hex" in p ? Buffer.from(p.hex, "hex") : files[p.copy].subarray(p.offset, p.offset + p.length))));
}

async function runVectors(path) {
  const doc = JSON.parse(readFileSync(path, "utf8"));
  const files = {};
  const valid = {};
  for (const v of doc.valid) {
    const file = bytes(v.file);
    files[v.id] = Buffer.from(file);
    const dataKey = bytes(v.data_key);
    const written = await encryptBytes(bytes(v.plaintext), {
      dataKey, recordingId: v.recording_id, wrappedKey: bytes(v.wrapped_key), segmentSize: v.segment_size,
      salt: bytes(v.salt), noncePrefix: bytes(v.nonce_prefix),
    });
    const header = file.subarray(0, v.header_length);
    const { header: read, plaintext } = await decryptBytes(file, () => dataKey);
    valid[v.id] = {
      encrypt: hex(written) === v.file,
      decrypt: hex(plaintext) === v.plaintext,
      header_sha256: createHash("sha256").update(header).digest("hex") === v.header_sha256,
      file_key: hex(await fileKeyBytes(dataKey, header, bytes(v.salt))) === v.file_key,
      nonces: v.segments.every((s) => hex(nonce(bytes(v.nonce_prefix), s.index, s.last)) === s.nonce),
      recording_id: read.recordingId === v.recording_id,
    };
  }
  const invalid = {};
  for (const v of doc.invalid) {
    const file = assemble(v.parts, files);
    if (createHash("sha256").update(file).digest("hex") !== v.file_sha256) throw new Error(`${v.id}: assembly`);
    let asked = false;
    let released = 0;
    const outcome = { refused: false };
    try {
      await decryptStream([new Uint8Array(file)], () => { asked = true; return bytes(v.data_key); }, (b) => { released += b.length; });
    } catch (err) {
      if (!(err instanceof RecordingError)) throw err;
      Object.assign(outcome, { refused: true, error: err.reason, stage: err.stage, released: err.released, asked_for_key: asked });
    }
    if (outcome.refused && outcome.released !== released) throw new Error(`${v.id}: released count`);
    invalid[v.id] = outcome;
  }
  return { valid, invalid };
}

async function main(argv) {
  const [command, ...args] = argv;
  if (command === "vectors") {
    process.stdout.write(JSON.stringify(await runVectors(args[0])) + "\n");
  } else if (command === "header") {
    const h = await readHeader(process.stdin);
    process.stdout.write(JSON.stringify({ recording_id: h.recordingId, wrapped_key: hex(h.wrappedKey), segment_size: h.segmentSize }) + "\n");
  } else if (command === "decrypt") {
    const key = bytes(option(args, "--key"));
    await decryptStream(process.stdin, () => key, writeOut);
  } else if (command === "encrypt") {
    await encryptStream(process.stdin, writeOut, {
      dataKey: bytes(option(args, "--key")), recordingId: option(args, "--recording-id"),
      wrappedKey: bytes(option(args, "--wrapped-key")), segmentSize: Number(option(args, "--segment-size", "262144")),
    });
  } else {
    throw new Error("usage: cli.mjs header | decrypt --key HEX | encrypt --key HEX --recording-id ID --wrapped-key HEX [--segment-size N] | vectors FILE");
  }
}

main(process.argv.slice(2)).catch((err) => {
  if (err instanceof RecordingError) {
    process.stderr.write(JSON.stringify({ error: err.reason, stage: err.stage, released: err.released }) + "\n");
  } else {
    process.stderr.write(`${err.message}\n`);
  }
  process.exitCode = err instanceof RecordingError ? 1 : 2;
});
