// A small JSON Schema check for task params: the subset a capability's `paramsSchema`
// usually needs (type, required, properties, additionalProperties: false, items, enum,
// const, minimum/maximum, minLength/maxLength, minItems/maxItems). Keywords it does not
// know are ignored, never refused. The hub does not check params (protocol §4.1); the
// agent does, before the handler runs, as the Python SDK does.

/** @param {unknown} value */
function typeName(value) {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  if (typeof value === "number") return Number.isInteger(value) ? "an integer" : "a number";
  if (typeof value === "string") return "a string";
  if (typeof value === "boolean") return "a boolean";
  return "an object";
}

const ARTICLE = /** @type {Record<string, string>} */ ({
  string: "a string", integer: "an integer", number: "a number", boolean: "a boolean",
  object: "an object", array: "an array", null: "null",
});

/** @param {string} type @param {unknown} value */
function isType(type, value) {
  switch (type) {
    case "string": return typeof value === "string";
    case "integer": return typeof value === "number" && Number.isInteger(value);
    case "number": return typeof value === "number" && Number.isFinite(value);
    case "boolean": return typeof value === "boolean";
    case "null": return value === null;
    case "array": return Array.isArray(value);
    case "object": return typeof value === "object" && value !== null && !Array.isArray(value);
    default: return true;
  }
}

/**
 * What is wrong with `value` against `schema`, or null.
 * @param {any} schema
 * @param {unknown} value
 * @param {string} where e.g. "param 'text'"
 * @returns {string | null}
 */
function check(schema, value, where) {
  if (!schema || typeof schema !== "object") return null;
  if (schema.type !== undefined) {
    const types = Array.isArray(schema.type) ? schema.type : [schema.type];
    if (!types.some((/** @type {string} */ type) => isType(type, value))) {
      const wanted = types.map((/** @type {string} */ type) => ARTICLE[type] ?? type).join(" or ");
      return `${where}: expected ${wanted}, got ${typeName(value)}`;
    }
  }
  if (Array.isArray(schema.enum) && !schema.enum.some((/** @type {unknown} */ option) => JSON.stringify(option) === JSON.stringify(value))) {
    return `${where}: must be one of ${schema.enum.map((/** @type {unknown} */ option) => JSON.stringify(option)).join(", ")}, got ${JSON.stringify(value)}`;
  }
  if ("const" in schema && JSON.stringify(schema.const) !== JSON.stringify(value)) {
    return `${where}: must be ${JSON.stringify(schema.const)}`;
  }
  if (typeof value === "number") {
    if (typeof schema.minimum === "number" && value < schema.minimum) return `${where}: must be at least ${schema.minimum}, got ${value}`;
    if (typeof schema.maximum === "number" && value > schema.maximum) return `${where}: must be at most ${schema.maximum}, got ${value}`;
  }
  if (typeof value === "string") {
    const length = Array.from(value).length;
    if (typeof schema.minLength === "number" && length < schema.minLength) return `${where}: must be at least ${schema.minLength} characters long`;
    if (typeof schema.maxLength === "number" && length > schema.maxLength) return `${where}: must be at most ${schema.maxLength} characters long`;
  }
  if (Array.isArray(value)) {
    if (typeof schema.minItems === "number" && value.length < schema.minItems) return `${where}: must have at least ${schema.minItems} items`;
    if (typeof schema.maxItems === "number" && value.length > schema.maxItems) return `${where}: must have at most ${schema.maxItems} items`;
    if (schema.items && typeof schema.items === "object" && !Array.isArray(schema.items)) {
      for (let i = 0; i < value.length; i += 1) {
        const problem = check(schema.items, value[i], `${where}[${i}]`);
        if (problem) return problem;
      }
    }
  }
  if (isType("object", value)) return checkObject(schema, /** @type {Record<string, unknown>} */ (value), where);
  return null;
}

/**
 * @param {any} schema
 * @param {Record<string, unknown>} value
 * @param {string} where
 * @returns {string | null}
 */
function checkObject(schema, value, where) {
  const properties = schema.properties && typeof schema.properties === "object" ? schema.properties : {};
  const top = where === "";
  const name = (/** @type {string} */ key) => (top ? `param '${key}'` : `${where}.${key}`);
  const missing = (Array.isArray(schema.required) ? schema.required : []).filter((/** @type {string} */ key) => !(key in value));
  if (missing.length) return `missing ${top ? "param(s)" : `field(s) of ${where}`}: ${missing.join(", ")}`;
  if (schema.additionalProperties === false) {
    const unknown = Object.keys(value).filter((key) => !(key in properties));
    if (unknown.length) return `unknown ${top ? "param(s)" : `field(s) of ${where}`}: ${unknown.join(", ")}`;
  }
  for (const [key, sub] of Object.entries(properties)) {
    if (!(key in value)) continue;
    const problem = check(sub, value[key], name(key));
    if (problem) return problem;
  }
  return null;
}

/**
 * What is wrong with a task's params against a capability's schema, or null.
 * @param {object | null | undefined} schema
 * @param {unknown} params
 * @returns {string | null}
 */
export function checkParams(schema, params) {
  if (!schema) return null;
  if (!isType("object", params)) return `params must be an object, got ${typeName(params)}`;
  const { type: _type, ...rest } = /** @type {any} */ (schema);
  return checkObject(rest, /** @type {Record<string, unknown>} */ (params), "");
}
