import { createApp } from 'vue';
import { Syncline } from 'syncline';
import App from './App.vue';
import './style.css';

// The server that serves this page also syncs it. All games live in one
// database; presence says who is where (lobby, a game, which seat).
const server = new URL('/sync', location.href);
server.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
const client = await Syncline.connect(server.toString(), { name: 'tictactoe' });
const db = await client.open('ttt-games');
const me = { replica: client.replica, name: `Player ${client.replica.slice(0, 4).toUpperCase()}` };

createApp(App, { db, me }).mount('#app');

// For the end-to-end tests and the curious.
Object.assign(globalThis, { syncline: { client, db, me } });
