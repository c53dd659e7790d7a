// Module resolve hook registered by authorize.mjs: `import ... from "undici"` gets undici_authorized.mjs,
// except inside that wrapper itself (which imports the real undici).
const WRAPPER = new URL("./undici_authorized.mjs", import.meta.url).href;

export async function resolve(specifier, context, nextResolve) {
  if (specifier === "undici" && context.parentURL !== WRAPPER) {
    return { url: WRAPPER, shortCircuit: true };
  }
  return nextResolve(specifier, context);
}
