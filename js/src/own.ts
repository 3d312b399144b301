/**
 * Own-property access for records keyed by document id. `__proto__` is a
 * valid document id; plain `obj[id] = v` would set the prototype instead
 * (losing the document) and `obj[id]` on a record without it reads
 * `Object.prototype`.
 */

/** `obj[key] = value`, always as an own enumerable property. */
export function setOwn<V>(obj: Record<string, V>, key: string, value: V): void {
  Object.defineProperty(obj, key, { value, enumerable: true, writable: true, configurable: true });
}

/** `obj[key]` if it is an own property, else `undefined`. */
export function getOwn<V>(obj: Record<string, V>, key: string): V | undefined {
  return Object.prototype.hasOwnProperty.call(obj, key) ? obj[key] : undefined;
}
