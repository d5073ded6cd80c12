// The task both JS projects build (copied to packages/app/ when the client
// suite prepares them): a small text naming the tool (argv[2]) and a 256 KiB
// blob, deterministic, so the artifact spans more than one socket read.
const tool = process.argv[2] || "a client";
const fs = require("fs");
fs.mkdirSync("dist", { recursive: true });
fs.writeFileSync("dist/out.txt", `built by ${tool} for sluice's client suite\n`);
const blob = Buffer.alloc(256 * 1024);
let x = 0x9e3779b9;
for (let i = 0; i < blob.length; i++) {
  x ^= x << 13; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
  blob[i] = x & 0xff;
}
fs.writeFileSync("dist/blob.bin", blob);
console.log("app: wrote dist/out.txt and dist/blob.bin");
