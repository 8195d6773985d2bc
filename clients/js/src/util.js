// Small pieces the client and the agent share: the reconnect backoff, a bounded queue
// read as an async iterator, event listeners, and an abortable sleep.

/** Listeners by event name: `on` adds one (and returns its remover), `emit` calls them. */
export class Listeners {
  constructor() {
    /** @type {Map<string, Set<(value: any) => void>>} */
    this._sets = new Map();
  }

  /**
   * @param {string} event
   * @param {(value: any) => void} listener
   * @returns {() => void} removes the listener
   */
  on(event, listener) {
    let set = this._sets.get(event);
    if (!set) this._sets.set(event, (set = new Set()));
    set.add(listener);
    return () => set.delete(listener);
  }

  /**
   * Call every listener of `event` with `value`; one that throws is reported to
   * `onError` and the others still run.
   * @param {string} event @param {unknown} value @param {(error: unknown) => void} onError
   */
  emit(event, value, onError) {
    for (const listener of this._sets.get(event) ?? []) {
      try {
        listener(value);
      } catch (error) {
        onError(error);
      }
    }
  }
}

/**
 * Reconnect delays: exponential with full jitter, `random(0, min(cap, base * 2 ** n))`
 * seconds after the n-th failed attempt in a row (as the Python SDK's `Backoff`).
 * `maxAttempts: null` retries for ever.
 */
export class Backoff {
  /** @param {{base?: number, cap?: number, maxAttempts?: number | null}} [options] */
  constructor({ base = 0.5, cap = 30, maxAttempts = null } = {}) {
    if (!(base > 0) || !(cap > 0)) throw new RangeError("Backoff base and cap must be positive seconds");
    if (maxAttempts !== null && !(Number.isInteger(maxAttempts) && maxAttempts > 0)) {
      throw new RangeError("Backoff maxAttempts must be a positive integer or null");
    }
    this.base = base;
    this.cap = cap;
    this.maxAttempts = maxAttempts;
  }

  /**
   * Seconds to wait after `attempt` failures in a row.
   * @param {number} attempt
   * @param {() => number} [random]
   */
  delay(attempt, random = Math.random) {
    return random() * Math.min(this.cap, this.base * 2 ** Math.min(attempt, 32));
  }
}

/**
 * A bounded FIFO read with `for await`. `push` never blocks: past `limit` items the
 * newest is dropped and counted in `dropped`. `end(error?)` finishes the iteration
 * (with `error` thrown to the reader, if given) once the items queued are read.
 * @template T
 */
export class Queue {
  /**
   * @param {number} [limit]
   * @param {() => void} [onReturn] called once when the reader stops (break, return, end)
   */
  constructor(limit = 1024, onReturn = undefined) {
    /** @type {T[]} */
    this.items = [];
    this.limit = limit;
    this.dropped = 0;
    this.ended = false;
    /** @type {unknown} */
    this.error = undefined;
    /** @type {((result: IteratorResult<T>) => void) | null} */
    this._wake = null;
    /** @type {((error: unknown) => void) | null} */
    this._fail = null;
    this._onReturn = onReturn;
  }

  /** @param {T} item @returns {boolean} whether it was queued */
  push(item) {
    if (this.ended) return false;
    if (this._wake) {
      const wake = this._wake;
      this._wake = this._fail = null;
      wake({ value: item, done: false });
      return true;
    }
    if (this.items.length >= this.limit) {
      this.dropped += 1;
      return false;
    }
    this.items.push(item);
    return true;
  }

  /** @param {unknown} [error] */
  end(error) {
    if (this.ended) return;
    this.ended = true;
    this.error = error;
    if (this._wake) {
      const wake = this._wake, fail = this._fail;
      this._wake = this._fail = null;
      if (error !== undefined && fail) fail(error);
      else wake({ value: undefined, done: true });
    }
    this._returned();
  }

  _returned() {
    const onReturn = this._onReturn;
    this._onReturn = undefined;
    onReturn?.();
  }

  /** @returns {Promise<IteratorResult<T>>} */
  next() {
    if (this.items.length) return Promise.resolve({ value: /** @type {T} */ (this.items.shift()), done: false });
    if (this.ended) {
      if (this.error !== undefined) {
        const error = this.error;
        this.error = undefined; // thrown once; then the iterator is simply done
        return Promise.reject(error);
      }
      return Promise.resolve({ value: undefined, done: true });
    }
    return new Promise((resolve, reject) => {
      this._wake = resolve;
      this._fail = reject;
    });
  }

  /** @returns {Promise<IteratorResult<T>>} */
  return() {
    this.items.length = 0;
    this.end();
    return Promise.resolve({ value: undefined, done: true });
  }

  [Symbol.asyncIterator]() {
    return this;
  }
}

/**
 * Resolve after `ms`, or at once when `signal` aborts (resolving, not rejecting).
 * @param {number} ms
 * @param {AbortSignal} [signal]
 */
export function sleep(ms, signal) {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve(undefined);
    const done = () => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve(undefined);
    };
    const timer = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
  });
}

/**
 * `promise`, or undefined after `ms` if it has not settled by then (and no timer is
 * left running either way, so nothing keeps the process alive).
 * @template T
 * @param {Promise<T>} promise
 * @param {number} ms
 * @returns {Promise<T | undefined>}
 */
export async function raceTimeout(promise, ms) {
  const stop = new AbortController();
  try {
    return await Promise.race([promise, sleep(ms, stop.signal).then(() => undefined)]);
  } finally {
    stop.abort();
  }
}

/** A promise with its resolve and reject (Promise.withResolvers is Node 22+). */
export function deferred() {
  /** @type {(value?: any) => void} */
  let resolve = () => {};
  /** @type {(error: unknown) => void} */
  let reject = () => {};
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

/**
 * A string for an abort reason: its message if an Error, itself if a string.
 * @param {unknown} reason
 * @param {string} fallback
 */
export function reasonText(reason, fallback) {
  if (typeof reason === "string" && reason.trim()) return reason;
  if (reason instanceof Error && reason.name !== "AbortError" && reason.message) return reason.message;
  return fallback;
}
