/**
 * Errors: every failure is an `Error` with a stable `code` to switch on.
 */

/** The codes a Syncline error can carry. */
export type SynclineErrorCode =
  // Local
  | 'InvalidOptions'
  | 'InvalidUrl'
  | 'InvalidDatabaseName'
  | 'InvalidDocumentId'
  | 'InvalidValue'
  | 'NotOpen'
  | 'Closed'
  | 'Unsupported'
  | 'TooManyTabs'
  | 'NoServer'
  // Local storage (IndexedDB)
  | 'QuotaExceeded'
  | 'StorageBlocked'
  | 'StorageUnavailable'
  | 'StorageCorrupt'
  | 'StorageFailed'
  // Refused by the server
  | 'Unauthorized'
  | 'Forbidden'
  | 'BadFrame'
  | 'TooLarge'
  | 'UnknownVersion'
  | 'InvalidChange'
  | 'Overloaded'
  | 'NotSubscribed'
  | 'OutOfOrder'
  | 'ProtocolViolation'
  | 'Internal'
  | 'ShuttingDown'
  | 'MissingDependency'
  | 'UnknownHorizon'
  | 'Unknown';

/** An error raised by Syncline. */
export interface SynclineError extends Error {
  name: 'SynclineError';
  code: SynclineErrorCode;
  /** The database concerned, when there is one. */
  db?: string;
}

/** Whether `e` is a Syncline error (optionally with the given code). */
export function isSynclineError(e: unknown, code?: SynclineErrorCode): e is SynclineError {
  return (
    e instanceof Error &&
    e.name === 'SynclineError' &&
    typeof (e as { code?: unknown }).code === 'string' &&
    (code === undefined || (e as SynclineError).code === code)
  );
}

/** Make a Syncline error. */
export function synclineError(code: SynclineErrorCode, message: string, db?: string): SynclineError {
  const e = new Error(message) as SynclineError;
  e.name = 'SynclineError';
  e.code = code;
  if (db !== undefined) e.db = db;
  return e;
}
