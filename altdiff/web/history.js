// The results kept in the browser's IndexedDB, so a reload shows the last ones; the oldest drop out.
const KEEP = 20;
let db = null;

function request(r) {
  return new Promise((resolve, reject) => {
    r.onsuccess = () => resolve(r.result);
    r.onerror = () => reject(r.error);
  });
}

async function open() {
  if (db === null) {
    const r = indexedDB.open("altdiff", 1);
    r.onupgradeneeded = () => r.result.createObjectStore("results", { autoIncrement: true });
    db = await request(r);
  }
  return db.transaction("results", "readwrite").objectStore("results");
}

// A browser without IndexedDB (or with it blocked) simply keeps no history.
export async function remember(result) {
  try {
    const store = await open();
    await request(store.add({ images: result.images, info: result.info }));
    const keys = await request(store.getAllKeys());
    for (const key of keys.slice(0, Math.max(0, keys.length - KEEP))) store.delete(key);
  } catch (e) {
    console.warn("history not kept:", e);
  }
}

// Oldest first, so prepending each in turn leaves the newest on top.
export async function recall() {
  try {
    return await request((await open()).getAll());
  } catch {
    return [];
  }
}
