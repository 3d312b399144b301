// The public surface shared by the browser and Node entry points.
export {
  Syncline,
  SynclineDb,
  Presence,
  type ChangeEvent,
  type ConnectOptions,
  type ConnectionStatus,
  type DbStatus,
  type Doc,
  type Path,
  type Peer,
  type ServerUrls,
  type TextField,
  type WriteOptions,
} from './client.js';
export { isSynclineError, type SynclineError, type SynclineErrorCode } from './errors.js';
