// Validates GLB files with the Khronos glTF validator; prints one JSON report summary per file and
// exits 1 when any file has errors. Usage: node validate.mjs FILE...
import { readFile } from "node:fs/promises";
import validator from "gltf-validator";

let failed = false;
for (const path of process.argv.slice(2)) {
  const data = new Uint8Array(await readFile(path));
  const report = await validator.validateBytes(data, { maxIssues: 100 });
  const { numErrors, numWarnings, numInfos, numHints, messages } = report.issues;
  console.log(JSON.stringify({ path, numErrors, numWarnings, numInfos, numHints,
    errors: messages.filter((m) => m.severity === 0) }));
  if (numErrors > 0) failed = true;
}
process.exit(failed ? 1 : 0);
